//! What each emulated endpoint checks of a request (IMDS, App Service, Entra), and the error
//! answers each sends, in the documented shapes.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use azgate_msi::request::{self as imds_rules, Query};
use azgate_msi::server::json_response;

use super::{
    DEFAULT_RETRY_AFTER_SECONDS, IMDS_API_VERSIONS, Identity, SUBSCRIPTION_ID,
    SYSTEM_ASSIGNED_RESOURCE_ID, TENANT_ID,
};

/// The checks IMDS applies to every request; the parsed query on success.
pub(crate) fn check_imds_headers(request: &Request<Bytes>) -> Result<Query, Response<Bytes>> {
    let query = imds_rules::check(request)
        .map_err(|refusal| imds_error(refusal.status, refusal.code, &refusal.description))?;
    if !query
        .first("api-version")
        .is_some_and(|version| IMDS_API_VERSIONS.contains(&version))
    {
        let body = json!({
            "error": "Bad request. api-version is invalid or was not specified in the request. For more information refer to aka.ms/azureimds",
            "newest-versions": ["2025-04-07", "2024-07-17", "2024-03-15"],
        });
        return Err(json_response(StatusCode::BAD_REQUEST, body.to_string()));
    }
    Ok(query)
}

pub(crate) fn check_imds_request(
    request: &Request<Bytes>,
) -> Result<(Identity, String), Response<Bytes>> {
    let query = check_imds_headers(request)?;
    let Some(resource) = query.first("resource").filter(|r| !r.is_empty()) else {
        return Err(imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'resource' is missing",
        ));
    };
    let selectors = [
        ("client_id", query.first("client_id")),
        ("object_id", query.first("object_id")),
        ("msi_res_id", query.first("msi_res_id")),
    ];
    let identity = select_identity(&selectors)
        .map_err(|message| imds_error(StatusCode::BAD_REQUEST, "invalid_request", message))?;
    Ok((identity, resource.to_owned()))
}

pub(crate) fn check_authority_request(
    request: &Request<Bytes>,
) -> Result<(Identity, String), Response<Bytes>> {
    let entra_error = |code: &str, description: &str| {
        json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": code, "error_description": description, "error_codes": [900144]})
                .to_string(),
        )
    };
    if request.method() != Method::POST {
        return Err(entra_error(
            "invalid_request",
            "AADSTS900561: The endpoint only accepts POST requests.",
        ));
    }
    let form: Vec<(String, String)> = form_urlencoded::parse(request.body())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    let field = |name: &str| {
        form.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    if field("grant_type") != Some("client_credentials") {
        return Err(entra_error(
            "unsupported_grant_type",
            "AADSTS70003: grant_type must be client_credentials",
        ));
    }
    let Some(client_id) = field("client_id").filter(|id| !id.is_empty()) else {
        return Err(entra_error(
            "invalid_request",
            "AADSTS900144: The request body must contain 'client_id'.",
        ));
    };
    let has_secret = field("client_secret").is_some_and(|secret| !secret.is_empty());
    let has_assertion = field("client_assertion_type")
        == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        && field("client_assertion").is_some_and(|assertion| assertion.split('.').count() == 3);
    if !has_secret && !has_assertion {
        return Err(entra_error(
            "invalid_client",
            "AADSTS7000216: 'client_assertion', 'client_secret' or 'request' is required",
        ));
    }
    let Some(scope) = field("scope") else {
        return Err(entra_error(
            "invalid_request",
            "AADSTS900144: The request body must contain 'scope'.",
        ));
    };
    let resource = azgate_filter::audience::resource_for_scope(scope).to_owned();
    let identity = select_identity(&[("client_id", Some(client_id))])
        .map_err(|message| entra_error("invalid_request", message))?;
    Ok((identity, resource))
}

/// Maps the request's selector (at most one may be given) to an identity.
pub(crate) fn select_identity(
    selectors: &[(&str, Option<&str>)],
) -> Result<Identity, &'static str> {
    let given: Vec<(&str, &str)> = selectors
        .iter()
        .filter_map(|(name, value)| value.map(|value| (*name, value)))
        .collect();
    let identity = match given.as_slice() {
        [] => Identity {
            client_id: derived_guid("client", SYSTEM_ASSIGNED_RESOURCE_ID),
            object_id: derived_guid("object", SYSTEM_ASSIGNED_RESOURCE_ID),
            resource_id: SYSTEM_ASSIGNED_RESOURCE_ID.to_owned(),
            echoed_selector: None,
        },
        [("msi_res_id", resource_id)] => Identity {
            client_id: derived_guid("client", resource_id),
            object_id: derived_guid("object", resource_id),
            resource_id: (*resource_id).to_owned(),
            echoed_selector: Some(("msi_res_id".to_owned(), (*resource_id).to_owned())),
        },
        [(kind, id)] => {
            let resource_id = format!(
                "/subscriptions/{SUBSCRIPTION_ID}/resourcegroups/azgate-emulator/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{kind}-{id}"
            );
            Identity {
                client_id: if *kind == "client_id" {
                    (*id).to_owned()
                } else {
                    derived_guid("client", &resource_id)
                },
                object_id: if *kind == "object_id" {
                    (*id).to_owned()
                } else {
                    derived_guid("object", &resource_id)
                },
                resource_id,
                echoed_selector: (*kind == "object_id")
                    .then(|| ("object_id".to_owned(), (*id).to_owned())),
            }
        }
        _ => return Err("Only one of client_id, object_id and msi_res_id may be specified"),
    };
    Ok(identity)
}

/// A stable GUID-shaped id derived from `seed` (FNV-1a; only needs to be deterministic).
pub(crate) fn derived_guid(kind: &str, seed: &str) -> String {
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for byte in kind.bytes().chain([0]).chain(seed.bytes()) {
        hash ^= u128::from(byte);
        hash = hash.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    let hex = format!("{hash:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

pub(crate) fn jwt(
    identity: &Identity,
    resource: &str,
    issued_at: u64,
    expires_on: u64,
    serial: u64,
) -> String {
    let header = json!({"typ": "JWT", "alg": "RS256", "kid": "azgate-emulator"});
    let claims = json!({
        "aud": resource,
        "iss": format!("https://sts.windows.net/{TENANT_ID}/"),
        "iat": issued_at,
        "nbf": issued_at,
        "exp": expires_on,
        "aio": "azgate-emulator",
        "appid": identity.client_id,
        "appidacr": "2",
        "idp": format!("https://sts.windows.net/{TENANT_ID}/"),
        "oid": identity.object_id,
        "sub": identity.object_id,
        "tid": TENANT_ID,
        "uti": format!("emulator-{serial}"),
        "ver": "1.0",
        "xms_mirid": identity.resource_id,
    });
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(format!("azgate-emulator-signature-{serial}")),
    )
}

pub(crate) fn status_fault(status: u16, retry_after: Option<u64>) -> Response<Bytes> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (code, description) = match status.as_u16() {
        400 => ("invalid_request", "Identity not found"),
        403 => ("forbidden", "Access denied"),
        404 => ("not_found", "IMDS endpoint is updating"),
        410 => ("service_unavailable", "IMDS is going through updates"),
        429 => (
            "invalid_request",
            "Temporarily throttled, too many requests",
        ),
        500 => ("server_error", "Internal server error"),
        503 => ("service_unavailable", "Service unavailable"),
        _ => ("server_error", "Emulated failure"),
    };
    let mut response = imds_error(status, code, description);
    let retry_after = retry_after
        .or((status == StatusCode::TOO_MANY_REQUESTS).then_some(DEFAULT_RETRY_AFTER_SECONDS));
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
    }
    response
}

pub(crate) fn imds_error(status: StatusCode, code: &str, description: &str) -> Response<Bytes> {
    json_response(
        status,
        json!({"error": code, "error_description": description}).to_string(),
    )
}

pub(crate) fn app_service_error(status: StatusCode, message: &str) -> Response<Bytes> {
    json_response(
        status,
        json!({"statusCode": status.as_u16(), "message": message}).to_string(),
    )
}
