//! `TokenService` over real loopback sockets: the IMDS protocol rules it enforces, the
//! allow-list, and how upstream errors reach IMDS clients.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Arc;
use std::time::Duration;

use azgate::token::{
    HttpClient, HyperClient, ManagedIdentity, ProviderConfig, RunningTokenService, Source,
    TokenProvider, TokenService,
};
use azgate_emulator::{Emulator, Fault};
use bytes::Bytes;
use http::{Request, Response};
use serde_json::Value;

const MIRID: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a";

struct Setup {
    emulator: Emulator,
    service: RunningTokenService,
    client: HyperClient,
}

async fn setup(config: ProviderConfig, allowed: Option<Vec<ManagedIdentity>>) -> Setup {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let provider = TokenProvider::new(
        Source::Imds {
            endpoint: emulator.base_url(),
        },
        Arc::new(HyperClient::new().unwrap()),
        config,
    );
    let mut service = TokenService::new(provider);
    if let Some(allowed) = allowed {
        service = service.with_allowed_identities(allowed);
    }
    let service = service.start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    Setup {
        emulator,
        service,
        client: HyperClient::new().unwrap(),
    }
}

impl Setup {
    async fn get(&self, path_and_query: &str, headers: &[(&str, &str)]) -> Response<Bytes> {
        let mut request = Request::get(format!(
            "http://{}{path_and_query}",
            self.service.local_addr()
        ));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.client
            .send(request.body(Bytes::new()).unwrap())
            .await
            .unwrap()
    }

    async fn token(&self, query: &str) -> Response<Bytes> {
        self.get(
            &format!("/metadata/identity/oauth2/token?{query}"),
            &[("Metadata", "true")],
        )
        .await
    }
}

fn json(response: &Response<Bytes>) -> Value {
    serde_json::from_slice(response.body()).unwrap()
}

fn encoded(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[tokio::test]
async fn answers_in_the_imds_shape_with_every_number_a_string() {
    let setup = setup(ProviderConfig::default(), None).await;
    let response = setup
        .token(&format!(
            "api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F&msi_res_id={}",
            encoded(MIRID)
        ))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    let body = json(&response);
    for field in ["expires_in", "expires_on", "ext_expires_in", "not_before"] {
        assert!(
            body[field].as_str().unwrap().parse::<u64>().is_ok(),
            "{field}: {}",
            body[field]
        );
    }
    let expires_in: u64 = body["expires_in"].as_str().unwrap().parse().unwrap();
    assert!((86_390..=86_400).contains(&expires_in), "{expires_in}");
    assert_eq!(body["resource"], "https://management.azure.com/");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["msi_res_id"], MIRID);
    assert_eq!(body["access_token"].as_str().unwrap().split('.').count(), 3);

    // The same request again is served from the cache.
    let again = setup
        .token(&format!(
            "api-version=2019-08-01&resource=https%3A%2F%2Fmanagement.azure.com%2F&mi_res_id={}",
            encoded(MIRID)
        ))
        .await;
    assert_eq!(json(&again)["access_token"], body["access_token"]);
    assert_eq!(setup.emulator.token_requests(), 1);
}

#[tokio::test]
async fn refuses_what_imds_refuses_without_calling_upstream() {
    let setup = setup(ProviderConfig::default(), None).await;
    let token_path = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r";
    /// (path and query, headers, expected IMDS error code)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        (token_path, &[], "bad_request_102"),
        (token_path, &[("Metadata", "True")], "bad_request_102"),
        (
            token_path,
            &[("Metadata", "true"), ("X-Forwarded-For", "10.1.2.3")],
            "bad_request",
        ),
        (
            "/metadata/identity/oauth2/token?resource=r",
            &[("Metadata", "true")],
            "bad_request",
        ),
        (
            "/metadata/identity/oauth2/token?api-version=2018-02-01",
            &[("Metadata", "true")],
            "invalid_request",
        ),
        (
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r&resource=s",
            &[("Metadata", "true")],
            "bad_request",
        ),
        (
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r&client_id=a&msi_res_id=b",
            &[("Metadata", "true")],
            "invalid_request",
        ),
    ];
    for (path, headers, code) in cases {
        let response = setup.get(path, headers).await;
        assert_eq!(response.status(), 400, "{path} {headers:?}");
        let body = json(&response);
        assert_eq!(body["error"], *code, "{path} {headers:?}: {body}");
        assert!(
            body["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
    }
    assert_eq!(
        setup
            .get("/elsewhere", &[("Metadata", "true")])
            .await
            .status(),
        404
    );
    assert_eq!(setup.emulator.token_requests(), 0);
}

#[tokio::test]
async fn serves_only_allowed_identities() {
    let allowed = vec![
        ManagedIdentity::ResourceId(MIRID.into()),
        ManagedIdentity::ClientId("c1".into()),
    ];
    let setup = setup(ProviderConfig::default(), Some(allowed)).await;
    assert_eq!(
        setup
            .token(&format!(
                "api-version=2018-02-01&resource=r&msi_res_id={}",
                encoded(MIRID)
            ))
            .await
            .status(),
        200
    );
    assert_eq!(
        setup
            .token("api-version=2018-02-01&resource=r&client_id=c1")
            .await
            .status(),
        200
    );
    for query in [
        "api-version=2018-02-01&resource=r",
        "api-version=2018-02-01&resource=r&client_id=c2",
    ] {
        let response = setup.token(query).await;
        assert_eq!(response.status(), 403, "{query}");
        assert_eq!(json(&response)["error"], "forbidden");
    }
    assert_eq!(setup.emulator.token_requests(), 2);
}

#[tokio::test]
async fn upstream_errors_reach_the_client_imds_style() {
    let setup = setup(ProviderConfig::default(), None).await;
    setup.emulator.set_fault(Fault::Status(400));
    let response = setup.token("api-version=2018-02-01&resource=a").await;
    assert_eq!(response.status(), 400);
    assert_eq!(json(&response)["error"], "invalid_request");
    assert!(
        json(&response)["error_description"]
            .as_str()
            .unwrap()
            .contains("Identity not found")
    );

    // A Retry-After beyond what a fetch waits ends it; the client sees the 429 and Retry-After.
    setup.emulator.set_fault(Fault::StatusRetryAfter(429, 120));
    let response = setup.token("api-version=2018-02-01&resource=b").await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "120");
    assert_eq!(setup.emulator.token_requests(), 2, "neither was retried");
}

#[tokio::test]
async fn the_deadline_answers_504_and_the_fetch_fills_the_cache() {
    let config = ProviderConfig {
        deadline: Duration::from_millis(200),
        ..ProviderConfig::default()
    };
    let setup = setup(config, None).await;
    setup
        .emulator
        .push_faults([Fault::Slow(Duration::from_millis(700))]);
    let response = setup.token("api-version=2018-02-01&resource=slow").await;
    assert_eq!(response.status(), 504);
    assert_eq!(json(&response)["error"], "service_unavailable");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        setup
            .token("api-version=2018-02-01&resource=slow")
            .await
            .status(),
        200
    );
    assert_eq!(setup.emulator.token_requests(), 1);

    let metrics = setup.get("/metrics", &[]).await;
    let text = String::from_utf8(metrics.body().to_vec()).unwrap();
    assert!(
        text.contains("azgate_token_deadline_exceeded_total 1"),
        "{text}"
    );
    assert!(text.contains("azgate_token_cache_hits_total 1"), "{text}");
    assert!(
        text.contains("azgate_token_age_seconds{key=\"imds system slow\"}"),
        "{text}"
    );
    assert_eq!(setup.get("/healthz", &[]).await.status(), 200);
}
