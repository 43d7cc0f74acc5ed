//! A fake Azure endpoint over TLS on loopback: records every request it receives (so tests can
//! assert what reached "Azure", or that nothing did) and answers 200 with a small ARM-style body.
//!
//! In ARM mode ([`FakeAzure::start_arm`]) it answers what `az login`, `az vm list` and
//! `az group list` ask Resource Manager, and only for a real managed-identity token (the IMDS
//! emulator's: a JWT carrying `xms_mirid` and `aud`); anything else gets ARM's 401.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::pki::Issued;

/// A request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The TLS SNI the client sent.
    pub sni: Option<String>,
    /// Headers, names lower-cased, in order (repeats kept).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Seen {
    /// All values of a header.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).first().copied()
    }

    /// Checks what every granted request must look like upstream: sent to `host` (Host and
    /// SNI), none of the headers meant for azgate, and exactly one credential: a Bearer MSI
    /// token (not the caller's `caller_jwt`) for `resource` and the managed identity `identity`.
    pub fn check_granted(
        &self,
        host: &str,
        resource: &str,
        identity: &str,
        caller_jwt: Option<&str>,
    ) -> Result<()> {
        ensure!(
            self.header("host") == Some(host),
            "upstream host {:?}, expected {host}",
            self.header("host")
        );
        ensure!(
            self.sni.as_deref() == Some(host),
            "upstream SNI {:?}",
            self.sni
        );
        for stripped in [
            "x-forwarded-client-cert",
            "x-forwarded-host",
            "proxy-authorization",
        ] {
            ensure!(self.header(stripped).is_none(), "upstream saw {stripped}");
        }
        let authorization = self.header_values("authorization");
        ensure!(
            authorization.len() == 1,
            "upstream authorization {authorization:?}"
        );
        let msi = authorization[0]
            .strip_prefix("Bearer ")
            .ok_or_else(|| anyhow!("upstream authorization is not Bearer"))?;
        ensure!(Some(msi) != caller_jwt, "the caller's JWT was forwarded");
        let claims =
            crate::jwt::payload(msi).ok_or_else(|| anyhow!("upstream token is not a JWT"))?;
        ensure!(claims["aud"] == resource, "MSI token aud {}", claims["aud"]);
        ensure!(
            claims["xms_mirid"]
                .as_str()
                .is_some_and(|m| m.eq_ignore_ascii_case(identity)),
            "MSI token for {}, expected {identity}",
            claims["xms_mirid"]
        );
        Ok(())
    }
}

/// The running fake.
#[derive(Clone)]
pub struct FakeAzure {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// How the fake answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// 200 `{"value": [], "fake": "azure"}` to everything.
    Echo,
    /// Resource Manager for `az`, refusing anything but an MSI token.
    Arm,
}

/// The `x-ms-request-id` of every echo answer.
pub const FAKE_REQUEST_ID: &str = "fa4e0000-0000-4000-8000-00000000a2a7";

/// The subscription the ARM fake lists (the emulator's).
pub const ARM_SUBSCRIPTION_ID: &str = azgate_emulator::SUBSCRIPTION_ID;

impl FakeAzure {
    /// Serves TLS with `server` (a certificate for the Azure host names) on 127.0.0.1.
    pub async fn start(server: &Issued) -> Result<Self> {
        Self::start_mode(server, Mode::Echo).await
    }

    /// Serves Resource Manager answers for `az` (see the module docs).
    pub async fn start_arm(server: &Issued) -> Result<Self> {
        Self::start_mode(server, Mode::Arm).await
    }

    async fn start_mode(server: &Issued, mode: Mode) -> Result<Self> {
        let certs = CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("server certificate")?;
        let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).context("server key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                // Without it an HTTP/2 answer (HEADERS, then DATA) waits for the gateway's
                // delayed ACK: ~11 ms per request at low rates (measured with the soak).
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        let sni = sni.clone();
                        async move { Ok::<_, hyper::Error>(answer(req, sni, &log, mode).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, seen })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Requests whose path starts with `prefix`.
    pub fn seen_with_path(&self, prefix: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.starts_with(prefix))
            .collect()
    }

    /// Takes everything received so far, so a long run (the soak) keeps only what it has not
    /// checked yet.
    pub fn take_seen(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .map(|mut seen| std::mem::take(&mut *seen))
            .unwrap_or_default()
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    sni: Option<String>,
    log: &Mutex<Vec<Seen>>,
    mode: Mode,
) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into(),
            )
        })
        .collect();
    // HTTP/2 carries the host as the URI authority, not a Host header.
    if let Some(authority) = req.uri().authority()
        && !headers.iter().any(|(k, _)| k == "host")
    {
        headers.push(("host".into(), authority.to_string()));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let seen = Seen {
        method,
        path,
        sni,
        headers,
        body,
    };
    let challenge = claims_challenge(&seen);
    let arm = (mode == Mode::Arm).then(|| data_plane_answer(&seen));
    let seen_correlation = seen
        .header("x-ms-correlation-request-id")
        .map(str::to_string);
    // A HEAD answer has no content (RFC 9110 §9.3.2); hyper's HTTP/2 server would send DATA
    // frames for a non-empty body, which the gateways rightly reset as a protocol error.
    let head = seen.method == "HEAD";
    if let Ok(mut log) = log.lock() {
        log.push(seen);
    }
    if let Some(answer) = challenge.or(arm) {
        let mut response = Response::builder()
            .status(answer.status)
            .header("content-type", answer.content_type)
            .header("x-fake-azure", "arm");
        if let Some(challenge) = answer.challenge {
            response = response.header("www-authenticate", challenge);
        }
        return response
            .body(Full::new(Bytes::from(answer.body)))
            .unwrap_or_default();
    }
    let body = if head {
        String::new()
    } else {
        serde_json::json!({"value": [], "fake": "azure"}).to_string()
    };
    // Azure's request ids: its own, and the caller's correlation id echoed.
    let correlation = seen_correlation.unwrap_or_else(|| "none".into());
    Response::builder()
        .header("content-type", "application/json")
        .header("x-fake-azure", "1")
        .header("x-ms-request-id", FAKE_REQUEST_ID)
        .header("x-ms-correlation-request-id", correlation)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// The claims of the request's bearer token if it is a managed-identity token (a JWT with
/// `xms_mirid` and `aud`, as the IMDS emulator issues them).
pub fn msi_token_claims(seen: &Seen) -> Option<serde_json::Value> {
    let token = seen.header("authorization")?.strip_prefix("Bearer ")?;
    let claims = crate::jwt::payload(token)?;
    (claims["xms_mirid"].is_string() && claims["aud"].is_string()).then_some(claims)
}

/// What the `Arm` mode answers.
struct Answer {
    status: u16,
    content_type: &'static str,
    challenge: Option<String>,
    body: String,
}

impl Answer {
    fn json(status: u16, body: serde_json::Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            challenge: None,
            body: body.to_string(),
        }
    }
}

/// Tokens the fake has revoked (continuous access evaluation). Tokens are unique per fetch, so
/// one set serves every fake in the process.
static REVOKED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The CAE fake: a request under `/cae/revoke` revokes its token, and a revoked token gets
/// Azure's claims challenge wherever it is sent.
fn claims_challenge(seen: &Seen) -> Option<Answer> {
    let token = seen
        .header("authorization")?
        .strip_prefix("Bearer ")?
        .to_string();
    let mut revoked = REVOKED.lock().ok()?;
    if seen.path.starts_with("/cae/revoke") && !revoked.contains(&token) {
        revoked.push(token.clone());
    }
    revoked.contains(&token).then(|| Answer {
        challenge: Some(
            "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", \
             error=\"insufficient_claims\", claims=\"eyJhY2Nlc3NfdG9rZW4iOnsibmJmIjp7ImVzc2VudGlhbCI6dHJ1ZSwidmFsdWUiOiIxNzY0NjMzNjAwIn19fQ==\""
                .into(),
        ),
        ..Answer::json(
            401,
            serde_json::json!({"error": {"code": "InvalidAuthenticationToken", "message": "fake Azure: the token was revoked"}}),
        )
    })
}

/// The host the request was for (SNI: the gateways send the Azure name).
fn host_of(seen: &Seen) -> String {
    seen.sni.clone().unwrap_or_default().to_ascii_lowercase()
}

/// Key Vault, Storage or Resource Manager, by host. The data planes answer a request without
/// a managed-identity token of their audience with their real challenge, as the services do.
fn data_plane_answer(seen: &Seen) -> Answer {
    let host = host_of(seen);
    let token = msi_token_claims(seen);
    let audience = |claims: &serde_json::Value, want: &str| {
        claims["aud"].as_str().map(|a| a.trim_end_matches('/')) == Some(want)
    };
    let tenant = azgate_emulator::TENANT_ID;
    if host.ends_with(".vault.azure.net") {
        let Some(claims) = token.filter(|c| audience(c, "https://vault.azure.net")) else {
            return Answer {
                challenge: Some(format!(
                    "Bearer authorization=\"https://login.microsoftonline.com/{tenant}\", resource=\"https://vault.azure.net\""
                )),
                ..Answer::json(
                    401,
                    serde_json::json!({"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}}),
                )
            };
        };
        let path = seen.path.split('?').next().unwrap_or_default();
        if seen.method == "GET" && path == "/secrets" {
            return Answer::json(
                200,
                serde_json::json!({"value": [{
                    "id": format!("https://{host}/secrets/demo-secret"),
                    "attributes": {"enabled": true, "created": 1764633600, "updated": 1764633600, "recoveryLevel": "Recoverable+Purgeable"},
                    "tags": {"listed-for": claims["xms_mirid"]},
                }], "nextLink": null}),
            );
        }
        return Answer::json(
            404,
            serde_json::json!({"error": {"code": "NotFound", "message": format!("fake Key Vault has nothing at {path}")}}),
        );
    }
    if host.ends_with(".blob.core.windows.net") {
        let xml_error = |status: u16, code: &str, challenge: Option<String>| Answer {
            status,
            content_type: "application/xml",
            challenge,
            body: format!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>fake Storage: {code}</Message></Error>"
            ),
        };
        let Some(claims) = token.filter(|c| audience(c, "https://storage.azure.com")) else {
            return xml_error(
                401,
                "NoAuthenticationInformation",
                Some(format!(
                    "Bearer authorization_uri=https://login.microsoftonline.com/{tenant}/oauth2/authorize resource_id=https://storage.azure.com"
                )),
            );
        };
        let (path, query) = seen.path.split_once('?').unwrap_or((&seen.path, ""));
        if seen.method == "GET" && path == "/demo" && query.contains("comp=list") {
            let identity = claims["xms_mirid"].as_str().unwrap_or_default();
            // The blob's name carries the identity's last path segment, so tests see the swap.
            let who = identity.rsplit('/').next().unwrap_or_default();
            return Answer {
                status: 200,
                content_type: "application/xml",
                challenge: None,
                body: format!(
                    "<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults ServiceEndpoint=\"https://{host}/\" ContainerName=\"demo\"><Blobs><Blob><Name>listed-for-{who}.txt</Name><Properties><Last-Modified>Wed, 02 Dec 2026 00:00:00 GMT</Last-Modified><Etag>0x8DD0000000000000</Etag><Content-Length>5</Content-Length><Content-Type>text/plain</Content-Type><BlobType>BlockBlob</BlobType><LeaseStatus>unlocked</LeaseStatus><LeaseState>available</LeaseState></Properties></Blob></Blobs><NextMarker /></EnumerationResults>"
                ),
            };
        }
        return xml_error(404, "ResourceNotFound", None);
    }
    let (status, body) = arm_answer(seen);
    Answer::json(status, body)
}

/// Resource Manager's answer to `seen`: the subscription list, resource groups and VMs of the
/// one subscription, or ARM-style errors.
fn arm_answer(seen: &Seen) -> (u16, serde_json::Value) {
    let error = |status: u16, code: &str, message: String| {
        (
            status,
            serde_json::json!({"error": {"code": code, "message": message}}),
        )
    };
    let Some(claims) = msi_token_claims(seen) else {
        return error(
            401,
            "InvalidAuthenticationToken",
            "fake ARM: the request carries no managed-identity token".into(),
        );
    };
    let identity = claims["xms_mirid"].as_str().unwrap_or_default();
    let path = seen
        .path
        .split('?')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let subscription = format!("/subscriptions/{ARM_SUBSCRIPTION_ID}");
    if seen.method != "GET" {
        return error(
            405,
            "MethodNotAllowed",
            format!("fake ARM serves GET only, not {}", seen.method),
        );
    }
    if path == "/subscriptions" {
        return (
            200,
            serde_json::json!({"value": [{
                "id": subscription,
                "subscriptionId": ARM_SUBSCRIPTION_ID,
                "tenantId": azgate_emulator::TENANT_ID,
                "displayName": "azgate fake subscription",
                "state": "Enabled",
                "subscriptionPolicies": {"locationPlacementId": "Public_2014-09-01", "quotaId": "PayAsYouGo_2014-09-01", "spendingLimit": "Off"},
                "authorizationSource": "RoleBased",
            }]}),
        );
    }
    if path == format!("{subscription}/resourcegroups") {
        return (
            200,
            serde_json::json!({"value": [
                {"id": format!("{subscription}/resourceGroups/azgate-demo"), "name": "azgate-demo",
                 "type": "Microsoft.Resources/resourceGroups", "location": "westeurope",
                 "properties": {"provisioningState": "Succeeded"}},
            ]}),
        );
    }
    if path == format!("{subscription}/providers/microsoft.compute/virtualmachines") {
        // The VM's tag names the identity whose token listed it, so tests see the swap happen.
        return (
            200,
            serde_json::json!({"value": [{
                "id": format!("{subscription}/resourceGroups/azgate-demo/providers/Microsoft.Compute/virtualMachines/demo-vm"),
                "name": "demo-vm",
                "type": "Microsoft.Compute/virtualMachines",
                "location": "westeurope",
                "tags": {"listed-for": identity},
                "properties": {
                    "vmId": "6c7cd2f4-0000-4000-8000-00000000a2a7",
                    "hardwareProfile": {"vmSize": "Standard_B1s"},
                    "provisioningState": "Succeeded",
                    "storageProfile": {"osDisk": {"osType": "Linux", "name": "demo-vm-os", "createOption": "FromImage"}},
                },
            }]}),
        );
    }
    error(404, "NotFound", format!("fake ARM has nothing at {path}"))
}
