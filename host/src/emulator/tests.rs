#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use super::*;

fn imds_request(query: &str) -> Request<Bytes> {
    Request::get(format!("{IMDS_TOKEN_PATH}?{query}"))
        .header("Metadata", "true")
        .body(Bytes::new())
        .unwrap()
}

fn json_body(response: &Response<Bytes>) -> Value {
    serde_json::from_slice(response.body()).unwrap()
}

fn claims(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "JWT-shaped: {token}");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
}

const MIRID: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

#[tokio::test]
async fn imds_token_has_string_numbers_and_the_identity_in_its_claims() {
    let emulator = Emulator::in_memory();
    let response = emulator
        .handle(imds_request(&format!(
            "api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F&msi_res_id={}",
            MIRID.replace('/', "%2F")
        )))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_body(&response);
    for field in ["expires_in", "expires_on", "ext_expires_in", "not_before"] {
        assert!(
            body[field].as_str().unwrap().parse::<u64>().is_ok(),
            "{field} is a numeric string"
        );
    }
    assert_eq!(body["expires_in"], "86400");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["refresh_token"], "");
    assert_eq!(body["resource"], "https://management.azure.com/");
    assert_eq!(body["msi_res_id"], MIRID, "IMDS echoes the selector");
    let token_claims = claims(body["access_token"].as_str().unwrap());
    assert_eq!(token_claims["aud"], "https://management.azure.com/");
    assert_eq!(token_claims["xms_mirid"], MIRID);
    assert_eq!(token_claims["tid"], TENANT_ID);
    assert_eq!(
        token_claims["exp"].as_u64().unwrap().to_string(),
        body["expires_on"].as_str().unwrap()
    );
    assert!(token_claims["oid"].as_str().unwrap().len() == 36);
    assert_eq!(emulator.token_requests(), 1);
    assert_eq!(emulator.issued_tokens(), 1);

    let system = json_body(
        &emulator
            .handle(imds_request("api-version=2018-02-01&resource=r"))
            .await,
    );
    assert!(system.get("msi_res_id").is_none() && system.get("object_id").is_none());
    assert_eq!(
        claims(system["access_token"].as_str().unwrap())["xms_mirid"],
        SYSTEM_ASSIGNED_RESOURCE_ID
    );
}

#[tokio::test]
async fn imds_protocol_violations_are_refused_like_imds() {
    let emulator = Emulator::in_memory();
    let no_metadata = Request::get(format!(
        "{IMDS_TOKEN_PATH}?api-version=2018-02-01&resource=r"
    ))
    .body(Bytes::new())
    .unwrap();
    let response = emulator.handle(no_metadata).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json_body(&response)["error"], "bad_request_102");

    let mut forwarded = imds_request("api-version=2018-02-01&resource=r");
    forwarded
        .headers_mut()
        .insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
    assert_eq!(
        emulator.handle(forwarded).await.status(),
        StatusCode::BAD_REQUEST
    );

    for query in [
        "resource=r",
        "api-version=1999-01-01&resource=r",
        "api-version=2018-02-01",
        "api-version=2018-02-01&resource=r&resource=s",
        "api-version=2018-02-01&resource=r&client_id=a&object_id=b",
    ] {
        let response = emulator.handle(imds_request(query)).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
    }
    assert_eq!(emulator.issued_tokens(), 0);
    assert_eq!(emulator.token_requests(), 7);
}

#[tokio::test]
async fn app_service_endpoint_requires_the_identity_header_and_sends_no_expires_in() {
    let emulator = Emulator::in_memory();
    let request = |header: Option<&str>| {
        let mut builder = Request::get(format!(
            "{APP_SERVICE_TOKEN_PATH}?api-version=2019-08-01&resource=https://vault.azure.net&mi_res_id={MIRID}"
        ));
        if let Some(header) = header {
            builder = builder.header("X-IDENTITY-HEADER", header);
        }
        builder.body(Bytes::new()).unwrap()
    };
    assert_eq!(
        emulator.handle(request(None)).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        emulator.handle(request(Some("wrong"))).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let response = emulator
        .handle(request(Some(DEFAULT_IDENTITY_HEADER)))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_body(&response);
    assert!(body.get("expires_in").is_none());
    assert!(body["expires_on"].as_str().unwrap().parse::<u64>().is_ok());
    assert_eq!(
        claims(body["access_token"].as_str().unwrap())["xms_mirid"],
        MIRID
    );
}

#[tokio::test]
async fn queued_faults_come_first_then_the_standing_fault() {
    let emulator = Emulator::in_memory();
    emulator.set_fault(Fault::Status(500));
    emulator.push_faults([Fault::Status(429), Fault::StatusRetryAfter(410, 9)]);
    let first = emulator
        .handle(imds_request("api-version=2018-02-01&resource=r"))
        .await;
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(first.headers()["retry-after"], "5");
    let second = emulator
        .handle(imds_request("api-version=2018-02-01&resource=r"))
        .await;
    assert_eq!(second.status(), StatusCode::GONE);
    assert_eq!(second.headers()["retry-after"], "9");
    let third = emulator
        .handle(imds_request("api-version=2018-02-01&resource=r"))
        .await;
    assert_eq!(third.status(), StatusCode::INTERNAL_SERVER_ERROR);
    emulator.set_fault(Fault::DateStringExpiry);
    let dated = json_body(
        &emulator
            .handle(imds_request("api-version=2018-02-01&resource=r"))
            .await,
    );
    assert!(dated["expires_on"].as_str().unwrap().ends_with("+00:00"));
    emulator.set_fault(Fault::MalformedJson);
    let malformed = emulator
        .handle(imds_request("api-version=2018-02-01&resource=r"))
        .await;
    assert!(serde_json::from_slice::<Value>(malformed.body()).is_err());
}

#[tokio::test]
async fn admin_api_switches_faults_over_http() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let admin = |path: &str, body: &'static str| {
        Request::post(format!("/emulator/{path}"))
            .body(Bytes::from_static(body.as_bytes()))
            .unwrap()
    };
    let set = emulator
        .handle(admin(
            "fault",
            r#"{"fault":"status","status":429,"retry_after":3}"#,
        ))
        .await;
    assert_eq!(set.status(), StatusCode::OK);
    let response = emulator
        .handle(imds_request("api-version=2018-02-01&resource=r"))
        .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "3");
    let bad = emulator
        .handle(admin("fault", r#"{"fault":"explode"}"#))
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    emulator
        .handle(admin("token-lifetime", r#"{"seconds":600}"#))
        .await;
    emulator.handle(admin("fault", r#"{"fault":"none"}"#)).await;
    let body = json_body(
        &emulator
            .handle(imds_request("api-version=2018-02-01&resource=r"))
            .await,
    );
    assert_eq!(body["expires_in"], "600");
    let stats = emulator
        .handle(Request::get("/emulator/stats").body(Bytes::new()).unwrap())
        .await;
    assert_eq!(json_body(&stats)["token_requests"], 2);
}

#[tokio::test(start_paused = true)]
async fn hang_never_answers_until_shutdown() {
    let emulator = Emulator::in_memory();
    emulator.set_fault(Fault::Hang);
    let answer = tokio::time::timeout(
        Duration::from_secs(3600),
        emulator.handle(imds_request("api-version=2018-02-01&resource=r")),
    )
    .await;
    assert!(answer.is_err(), "a hanging emulator must not answer");
}
