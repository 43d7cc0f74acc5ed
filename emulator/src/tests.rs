#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

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

async fn status_of(emulator: &Emulator) -> u16 {
    emulator
        .handle(imds_request("api-version=2018-02-01&resource=r"))
        .await
        .status()
        .as_u16()
}

#[tokio::test(start_paused = true)]
async fn scheduled_faults_follow_the_clock_then_the_standing_fault_returns() {
    let emulator = Emulator::in_memory();
    let end = emulator.schedule_faults([
        (Duration::from_secs(60), Fault::Status(410)),
        (Duration::from_secs(10), Fault::Status(500)),
    ]);
    assert_eq!(end, tokio::time::Instant::now() + Duration::from_secs(70));
    // A queued one-shot fault still comes first.
    emulator.push_faults([Fault::Status(429)]);
    assert_eq!(status_of(&emulator).await, 429);
    assert_eq!(status_of(&emulator).await, 410);
    tokio::time::advance(Duration::from_millis(59_900)).await;
    assert_eq!(status_of(&emulator).await, 410);
    tokio::time::advance(Duration::from_millis(200)).await;
    assert_eq!(status_of(&emulator).await, 500);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(
        status_of(&emulator).await,
        200,
        "recovered after the schedule"
    );
    emulator.set_fault(Fault::Status(503));
    assert_eq!(status_of(&emulator).await, 503, "then the standing fault");

    // A new schedule replaces the old one; an empty one cancels it.
    emulator.set_fault(Fault::None);
    emulator.schedule_faults([(Duration::from_secs(5), Fault::MalformedJson)]);
    emulator.schedule_faults([(Duration::from_secs(5), Fault::Status(404))]);
    assert_eq!(status_of(&emulator).await, 404);
    emulator.schedule_faults([]);
    assert_eq!(status_of(&emulator).await, 200);
}

#[tokio::test(start_paused = true)]
async fn admin_api_schedules_faults_and_reports_traffic() {
    let emulator = Emulator::in_memory();
    let admin = |path: &str, body: &'static str| {
        Request::post(format!("/emulator/{path}"))
            .body(Bytes::from_static(body.as_bytes()))
            .unwrap()
    };
    let set = emulator
        .handle(admin(
            "schedule",
            r#"[{"for_ms":60000,"fault":{"fault":"status","status":410}}]"#,
        ))
        .await;
    assert_eq!(set.status(), StatusCode::OK);
    assert_eq!(status_of(&emulator).await, 410);
    assert_eq!(status_of(&emulator).await, 410);
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(status_of(&emulator).await, 200);
    for bad in [
        r#"[{"fault":{"fault":"hang"}}]"#,
        r#"[{"for_ms":1,"fault":{"fault":"explode"}}]"#,
        r#"[{"for_ms":1,"fault":{"fault":"hang"},"extra":1}]"#,
    ] {
        let refused = emulator
            .handle(
                Request::post("/emulator/schedule")
                    .body(Bytes::from(bad))
                    .unwrap(),
            )
            .await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let stats = json_body(
        &emulator
            .handle(Request::get("/emulator/stats").body(Bytes::new()).unwrap())
            .await,
    );
    assert_eq!(stats["token_requests"], 3);
    assert_eq!(stats["in_flight"], 0);
    assert_eq!(stats["peak_in_flight"], 1);
    // Two requests at the same instant, the third 60 s later.
    assert_eq!(stats["peak_per_second"], 2);
    emulator.handle(admin("reset", "")).await;
    assert!(emulator.token_request_times().is_empty());
}

#[test]
fn busiest_window_counts_arrivals_less_than_a_window_apart() {
    let start = tokio::time::Instant::now();
    // 21 starts spaced 50 ms: 20/s exactly, so no 1 s window holds 21.
    let mut times: Vec<_> = (0..21u32)
        .map(|n| start + Duration::from_millis(50) * n)
        .collect();
    times.reverse();
    assert_eq!(busiest_window(&times, Duration::from_secs(1)), 20);
    assert_eq!(busiest_window(&times, Duration::from_millis(1001)), 21);
    assert_eq!(busiest_window(&times, Duration::from_millis(100)), 2);
    times.push(start + Duration::from_millis(25));
    assert_eq!(busiest_window(&times, Duration::from_secs(1)), 21);
    assert_eq!(busiest_window(&[], Duration::from_secs(1)), 0);
}

#[tokio::test(start_paused = true)]
async fn token_request_times_are_recorded_per_request() {
    let emulator = Emulator::in_memory();
    let start = tokio::time::Instant::now();
    for _ in 0..3 {
        status_of(&emulator).await;
        tokio::time::advance(Duration::from_millis(400)).await;
    }
    // The identity-info path is not a token request.
    emulator
        .handle(
            Request::get("/metadata/identity/info?api-version=2018-02-01")
                .header("Metadata", "true")
                .body(Bytes::new())
                .unwrap(),
        )
        .await;
    let times = emulator.token_request_times();
    assert_eq!(
        times
            .iter()
            .map(|at| at.duration_since(start))
            .collect::<Vec<_>>(),
        [0, 400, 800].map(Duration::from_millis)
    );
    assert_eq!(emulator.peak_token_requests(Duration::from_millis(800)), 2);
    assert_eq!(emulator.peak_token_requests(Duration::from_millis(801)), 3);
    emulator.reset_traffic();
    assert!(emulator.token_request_times().is_empty());
}

/// Sends a raw HTTP/1.1 token request and returns the open connection.
async fn open_token_request(emulator: &Emulator) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(emulator.local_addr())
        .await
        .unwrap();
    stream
        .write_all(
            format!(
                "GET {IMDS_TOKEN_PATH}?api-version=2018-02-01&resource=r HTTP/1.1\r\n\
                 host: localhost\r\nmetadata: true\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

async fn wait_for_in_flight(emulator: &Emulator, expected: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while emulator.in_flight_token_requests() != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "in flight {} (expected {expected})",
            emulator.in_flight_token_requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn in_flight_counts_hanging_requests_until_their_client_goes_away() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    emulator.set_fault(Fault::Hang);
    let first = open_token_request(&emulator).await;
    let second = open_token_request(&emulator).await;
    let third = open_token_request(&emulator).await;
    wait_for_in_flight(&emulator, 3).await;
    assert_eq!(emulator.peak_in_flight_token_requests(), 3);
    // A client giving up (as a timed-out caller does) releases its request.
    drop(first);
    wait_for_in_flight(&emulator, 2).await;
    emulator.reset_peak_in_flight();
    assert_eq!(emulator.peak_in_flight_token_requests(), 2);
    assert_eq!(emulator.token_request_times().len(), 3, "arrivals are kept");
    drop((second, third));
    wait_for_in_flight(&emulator, 0).await;
    assert_eq!(emulator.peak_in_flight_token_requests(), 2);
    emulator.reset_traffic();
    assert_eq!(emulator.peak_in_flight_token_requests(), 0);

    // Answered requests stop counting too.
    emulator.set_fault(Fault::Slow(Duration::from_millis(300)));
    let request = || {
        Request::get(format!(
            "{}?api-version=2018-02-01&resource=r",
            emulator.imds_token_url()
        ))
        .header("metadata", "true")
        .body(Bytes::new())
        .unwrap()
    };
    let (a, b) = tokio::join!(emulator.handle(request()), emulator.handle(request()));
    assert_eq!(a.status(), StatusCode::OK);
    assert_eq!(b.status(), StatusCode::OK);
    assert_eq!(emulator.in_flight_token_requests(), 0);
    assert_eq!(emulator.peak_in_flight_token_requests(), 2);
}
