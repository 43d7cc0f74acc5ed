//! The whole decision on an arbitrary header map: a real configuration, the fixture
//! certificates and tokens, a fixed clock. The input optionally starts from a valid request and
//! edits it (add, remove, replace, rename headers) with values that are raw bytes or built
//! around the fixtures (XFCC models, signed tokens, Azure hosts).
//!
//! Checks: no panic; a refusal is a documented 4xx; the audit line is JSON and holds no bearer
//! token; the same answer with a warm cache; and an allowed request had one XFCC that the
//! contract accepts, a request line that can be forwarded, clean read headers, an Azure target,
//! and (when a token is injected) a JWT signed by the certificate's key.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use azgate_filter::decision::VerificationCache;
use azgate_filter::endpoint::Cloud;
use azgate_fuzz::xfcc::{Expect, Xfcc};
use azgate_fuzz::{IDENTITY, Which, api, fixtures, signing_input};
use libfuzzer_sys::fuzz_target;

const READ: [&str; 6] = [
    "x-forwarded-client-cert",
    "authorization",
    "x-forwarded-host",
    ":method",
    ":path",
    ":authority",
];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Known {
    Method,
    Path,
    Authority,
    Xfcc,
    Authorization,
    ForwardedHost,
    Host,
    Forwarded,
    Connection,
}

impl Known {
    fn name(self) -> &'static str {
        match self {
            Self::Method => ":method",
            Self::Path => ":path",
            Self::Authority => ":authority",
            Self::Xfcc => "x-forwarded-client-cert",
            Self::Authorization => "authorization",
            Self::ForwardedHost => "x-forwarded-host",
            Self::Host => "host",
            Self::Forwarded => "forwarded",
            Self::Connection => "connection",
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Name {
    Known(Known),
    Upper(Known),
    Other(String),
}

impl Name {
    fn render(&self) -> String {
        match self {
            Self::Known(k) => k.name().into(),
            Self::Upper(k) => k.name().to_ascii_uppercase(),
            Self::Other(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Scheme {
    Bearer,
    Lower,
    Basic,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Token {
    Fixture(u8),
    /// Claims built here, signed by the P-256 fixture key (RSA signing is ~100x slower; RS256
    /// tokens come from the fixtures, and `jws_signed` covers RSA-signed shapes).
    Claims {
        alg: bool,
        resource: String,
        exp: Option<i32>,
        nbf: Option<i32>,
    },
    /// Header and payload bytes from the fuzzer, signed by the P-256 fixture key.
    Signed {
        header: Vec<u8>,
        payload: Vec<u8>,
    },
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Host {
    Suffix {
        cloud: u8,
        index: u8,
        prefix: String,
        port: Option<u16>,
        upper: bool,
        dot: bool,
    },
    Raw(String),
}

const METHODS: [&str; 11] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "connect",
    "get",
];

#[derive(Arbitrary, Debug)]
enum Value {
    Raw(Vec<u8>),
    Text(String),
    XfccFixture(Which),
    Xfcc(Xfcc),
    Authorization {
        scheme: Scheme,
        token: Token,
        pad: bool,
    },
    Host(Host),
    Method(u8),
    Path(String),
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Add(Name, Value),
    Remove(u8),
    Set(u8, Value),
    Rename(u8, Name),
}

#[derive(Arbitrary, Debug)]
struct Input {
    base: Option<Which>,
    lenient_config: bool,
    edits: Vec<Edit>,
}

/// A header with what the model knows about its value.
struct Header {
    name: String,
    value: Vec<u8>,
    /// For XFCC values: the certificate they stand for, per the contract.
    xfcc: Option<Expect>,
}

/// Renders a value; tokens signed here are recorded with their signer.
fn render(value: &Value, signed: &mut HashMap<String, Which>) -> (Vec<u8>, Option<Expect>) {
    let fx = fixtures();
    match value {
        Value::Raw(bytes) => (bytes.clone(), None),
        Value::Text(s) => (s.clone().into_bytes(), None),
        Value::XfccFixture(which) => (fx.xfcc(*which).into_bytes(), Some(Expect::Accept(*which))),
        Value::Xfcc(model) => {
            let (text, expect) = model.render(fx);
            (text.into_bytes(), Some(expect))
        }
        Value::Authorization { scheme, token, pad } => {
            let token = match token {
                Token::Fixture(i) => fx.tokens[usize::from(*i) % fx.tokens.len()].1.clone(),
                Token::Claims {
                    alg,
                    resource,
                    exp,
                    nbf,
                } => {
                    let which = &Which::P256;
                    let alg = if *alg { "ES256" } else { "RS256" };
                    let mut claims = serde_json::json!({ "resource": resource });
                    if let Some(exp) = exp {
                        claims["exp"] = (fx.now + i64::from(*exp)).into();
                    }
                    if let Some(nbf) = nbf {
                        claims["nbf"] = (fx.now + i64::from(*nbf)).into();
                    }
                    let header = serde_json::json!({ "alg": alg, "typ": "JWT" }).to_string();
                    let t = fx.sign(*which, header.as_bytes(), claims.to_string().as_bytes());
                    signed.insert(t.clone(), *which);
                    t
                }
                Token::Signed { header, payload } => {
                    let t = fx.sign(Which::P256, header, payload);
                    signed.insert(t.clone(), Which::P256);
                    t
                }
                Token::Raw(s) => s.clone(),
            };
            let scheme = match scheme {
                Scheme::Bearer => "Bearer".to_string(),
                Scheme::Lower => "bearer".to_string(),
                Scheme::Basic => "Basic".to_string(),
                Scheme::Other(s) => s.clone(),
            };
            let text = if *pad {
                format!(" {scheme}  {token} ")
            } else {
                format!("{scheme} {token}")
            };
            (text.into_bytes(), None)
        }
        Value::Host(Host::Suffix {
            cloud,
            index,
            prefix,
            port,
            upper,
            dot,
        }) => {
            let suffixes = Cloud::ALL[usize::from(*cloud) % 3].suffixes();
            let mut host = format!("{prefix}{}", suffixes[usize::from(*index) % suffixes.len()]);
            if *upper {
                host = host.to_ascii_uppercase();
            }
            if *dot {
                host.push('.');
            }
            if let Some(port) = port {
                host.push_str(&format!(":{port}"));
            }
            (host.into_bytes(), None)
        }
        Value::Host(Host::Raw(s)) => (s.clone().into_bytes(), None),
        Value::Method(i) => (METHODS[usize::from(*i) % METHODS.len()].into(), None),
        Value::Path(p) => (p.clone().into_bytes(), None),
    }
}

fn base_request(which: Which) -> Vec<Header> {
    let fx = fixtures();
    let token = fx
        .tokens
        .iter()
        .find(|(w, _)| *w == which)
        .expect("a fixture token for each key")
        .1
        .clone();
    let plain = |name: &str, value: &str| Header {
        name: name.into(),
        value: value.as_bytes().to_vec(),
        xfcc: None,
    };
    vec![
        plain(":method", "GET"),
        plain(":path", "/subscriptions?api-version=2022-12-01"),
        plain(":authority", "gateway.test"),
        Header {
            name: "x-forwarded-client-cert".into(),
            value: fx.xfcc(which).into_bytes(),
            xfcc: Some(Expect::Accept(which)),
        },
        plain("authorization", &format!("Bearer {token}")),
        plain("x-forwarded-host", "management.azure.com"),
        plain("user-agent", "AZURECLI/2.91"),
    ]
}

/// Values of the headers named `name`, as the filter counts them (empty ones are absent).
fn present<'a>(headers: &'a [Header], name: &str) -> Vec<&'a Header> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .filter(|h| !h.value.iter().all(|b| *b == b' ' || *b == b'\t'))
        .collect()
}

fn host_is_azure(host: &str, clouds: &[Cloud]) -> bool {
    let clean = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && !host.starts_with('.')
        && !host.ends_with('.')
        && !host.contains("..");
    clean
        && clouds.iter().any(|c| {
            c.suffixes()
                .iter()
                .any(|s| host == *s || host.ends_with(&format!(".{s}")))
        })
}

fuzz_target!(|input: Input| {
    let fx = fixtures();
    let config_index = usize::from(input.lenient_config);
    let config = &fx.configs[config_index];
    let clouds: &[Cloud] = if input.lenient_config {
        &Cloud::ALL
    } else {
        &[Cloud::Public]
    };
    let mut signed = HashMap::new();
    let mut headers = input.base.map(base_request).unwrap_or_default();
    for edit in &input.edits {
        match edit {
            Edit::Add(name, value) => {
                let (value, xfcc) = render(value, &mut signed);
                headers.push(Header {
                    name: name.render(),
                    value,
                    xfcc,
                });
            }
            Edit::Remove(i) if !headers.is_empty() => {
                headers.remove(usize::from(*i) % headers.len());
            }
            Edit::Set(i, value) if !headers.is_empty() => {
                let at = usize::from(*i) % headers.len();
                let (value, xfcc) = render(value, &mut signed);
                headers[at].value = value;
                headers[at].xfcc = xfcc;
            }
            Edit::Rename(i, name) if !headers.is_empty() => {
                let at = usize::from(*i) % headers.len();
                headers[at].name = name.render();
            }
            _ => {}
        }
    }
    let pairs: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|h| (h.name.clone(), h.value.clone()))
        .collect();

    let mut cache = VerificationCache::new(4);
    let (audit, result) = api::decide(&pairs, config, fx.now, &mut cache);
    let (_, again) = api::decide(&pairs, config, fx.now, &mut cache);
    match (&result, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "a warm cache changed the grant"),
        (Err(a), Err(b)) => assert_eq!(a.code(), b.code(), "a warm cache changed the refusal"),
        _ => panic!("a warm cache changed the decision"),
    }

    let line = audit.line(result.as_ref().map(|_| ()));
    let parsed: serde_json::Value = serde_json::from_str(&line).expect("the audit line is JSON");
    // The query string never reaches the audit line (`?` alone may be a replaced byte).
    let audit_path = parsed["path"].as_str().unwrap_or_default();
    let paths: Vec<String> = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(":path"))
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        .collect();
    for path in &paths {
        if let Some((_, query)) = path.split_once('?')
            && query.len() >= 4
            && !paths
                .iter()
                .any(|p| p.split('?').next().unwrap_or_default().contains(query))
        {
            assert!(
                !audit_path.contains(query),
                "the audit path keeps the query {query:?}"
            );
        }
    }
    for auth in present(&headers, "authorization") {
        let text = String::from_utf8_lossy(&auth.value);
        let Some(token) = text.split_whitespace().nth(1) else {
            continue;
        };
        let elsewhere = headers
            .iter()
            .filter(|h| !h.name.eq_ignore_ascii_case("authorization"))
            .any(|h| String::from_utf8_lossy(&h.value).contains(token));
        if token.len() >= 16 && !elsewhere {
            assert!(
                !line.contains(token),
                "the audit line holds the bearer token"
            );
        }
    }

    let grant = match result {
        Err(refusal) => {
            assert!(
                [400, 401, 403, 405].contains(&refusal.status()),
                "refused with {} {}: {}",
                refusal.status(),
                refusal.code(),
                refusal.message()
            );
            return;
        }
        Ok(grant) => grant,
    };

    // Allowed: every read header is clean text.
    for h in &headers {
        if READ.iter().any(|r| h.name.eq_ignore_ascii_case(r)) {
            let text = std::str::from_utf8(&h.value)
                .unwrap_or_else(|_| panic!("allowed with a non-UTF-8 {}", h.name));
            assert!(
                !text.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f),
                "allowed with control characters in {}",
                h.name
            );
        }
    }
    // A forwardable request line.
    let method = present(&headers, ":method")
        .first()
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        .unwrap_or_default();
    assert!(
        !method.eq_ignore_ascii_case("CONNECT") && !method.eq_ignore_ascii_case("TRACE"),
        "allowed a {method} request"
    );
    let path = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(":path") && !h.value.is_empty());
    assert!(
        path.is_some_and(|h| h.value.starts_with(b"/")),
        "allowed a request whose target is not a path"
    );
    // Exactly one XFCC, and one the contract accepts.
    let xfcc = present(&headers, "x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "allowed with {} XFCC values", xfcc.len());
    let accepted = match xfcc[0].xfcc {
        Some(Expect::Refuse) => panic!(
            "allowed with an XFCC the contract refuses: {:?}",
            String::from_utf8_lossy(&xfcc[0].value)
        ),
        Some(Expect::Accept(which)) => Some(which),
        _ => None,
    };
    // An Azure endpoint of an enabled cloud, and the certificate's identity.
    assert!(
        host_is_azure(&grant.target, clouds),
        "allowed target {:?}",
        grant.target
    );
    assert!(grant.identity.as_str().eq_ignore_ascii_case(IDENTITY));
    // The token, if one is injected, was signed by the accepted certificate's key.
    let authorization = present(&headers, "authorization");
    match &grant.resource {
        None => {
            assert!(
                config.allow_unauthenticated,
                "no resource without allow_unauthenticated"
            );
            assert!(
                authorization.is_empty(),
                "no resource with an Authorization header"
            );
        }
        Some(resource) => {
            assert_eq!(
                authorization.len(),
                1,
                "allowed with several Authorization values"
            );
            let text = String::from_utf8_lossy(&authorization[0].value);
            let token = text.split_whitespace().nth(1).unwrap_or_default();
            let signer = fx.signer(token).or_else(|| {
                signed
                    .iter()
                    .find(|(t, _)| signing_input(t) == signing_input(token))
                    .map(|(_, w)| *w)
            });
            let Some(signer) = signer else {
                panic!("allowed with a token no fixture key signed");
            };
            if let Some(which) = accepted {
                assert_eq!(
                    signer, which,
                    "the token was signed by another certificate's key"
                );
            }
            assert!(resource.bytes().all(|b| b.is_ascii_graphic()));
        }
    }
});
