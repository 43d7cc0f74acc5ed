//! The request rules IMDS enforces, shared by the emulator (which imitates IMDS) and the token
//! service (which stands in for it), so the two cannot drift apart.

use bytes::Bytes;
use http::{Method, Request, StatusCode};

/// Why a request was refused, in IMDS's terms.
#[derive(Debug)]
pub struct Refusal {
    /// The HTTP status IMDS answers with.
    pub status: StatusCode,
    /// IMDS's `error` code, e.g. `bad_request_102`.
    pub code: &'static str,
    /// IMDS's `error_description`.
    pub description: String,
}

/// Query parameters in the order given.
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses a query string; `Err(name)` names the first parameter given twice ("Requests with
    /// duplicate query parameter names will be rejected").
    pub fn parse(query: Option<&str>) -> Result<Query, String> {
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .map(|(key, value)| (key.into_owned(), value.into_owned()))
                .collect();
        for (index, (key, _)) in pairs.iter().enumerate() {
            if pairs[..index].iter().any(|(earlier, _)| earlier == key) {
                return Err(key.clone());
            }
        }
        Ok(Query(pairs))
    }

    /// The value of parameter `name`.
    pub fn first(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// GET only, no `X-Forwarded-For`, `Metadata: true` (lower case), no duplicate parameters.
/// `api-version` and the token parameters are left to the caller.
pub fn check(request: &Request<Bytes>) -> Result<Query, Refusal> {
    let refuse = |status, code, description: &str| Refusal {
        status,
        code,
        description: description.to_owned(),
    };
    if request.method() != Method::GET {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Only GET is supported",
        ));
    }
    if request.headers().contains_key("x-forwarded-for") {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Requests with an X-Forwarded-For header are not allowed",
        ));
    }
    if request
        .headers()
        .get("metadata")
        .map(|value| value.as_bytes())
        != Some(b"true")
    {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "bad_request_102",
            "Required metadata header not specified",
        ));
    }
    Query::parse(request.uri().query()).map_err(|name| {
        refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("Duplicate query parameter {name}"),
        )
    })
}
