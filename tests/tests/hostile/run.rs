//! Running one case: the request, its exchange over raw HTTP/1.1 or HTTP/2, and the checks of the answer and of what the upstream saw.

use super::*;

/// What a runtime did with a case.
#[derive(Clone, Debug)]
pub(crate) enum Observed {
    Answer {
        status: u16,
        code: Option<String>,
        from_upstream: bool,
    },
    Closed(String),
    TlsRefused(String),
    TimedOut,
}

impl Observed {
    pub(crate) fn describe(&self) -> String {
        match self {
            Observed::Answer {
                status,
                code,
                from_upstream,
            } => match (code, from_upstream) {
                (Some(code), _) => format!("{status} {code}"),
                (None, true) => format!("{status} (forwarded)"),
                (None, false) => format!("{status} -"),
            },
            Observed::Closed(why) => format!("closed ({why})"),
            Observed::TlsRefused(why) => format!("tls_refused ({why})"),
            Observed::TimedOut => "no answer (hang)".into(),
        }
    }
}

/// One topology per runtime, started on first use, and its certificate minter.
pub(crate) struct Shared {
    pub(crate) runtime: Runtime,
    pub(crate) options: Options,
    pub(crate) identities: HashMap<String, String>,
    pub(crate) cell: OnceCell<(Topology, HostilePki)>,
}

impl Shared {
    pub(crate) async fn get(&self) -> Result<&(Topology, HostilePki)> {
        self.cell
            .get_or_try_init(|| async {
                let topology = Topology::start(self.runtime, self.options.clone()).await?;
                let pki = HostilePki::new(topology.ca.authority(), self.identities.clone())?;
                Ok::<_, anyhow::Error>((topology, pki))
            })
            .await
    }
}

/// Per runtime: what each case observed and whether it passed.
#[derive(Default)]
pub(crate) struct Results {
    pub(crate) rows: Mutex<BTreeMap<(&'static str, String), Row>>,
}

#[derive(Clone)]
pub(crate) struct Row {
    pub(crate) marker: String,
    pub(crate) category: String,
    pub(crate) observed: Option<Observed>,
    pub(crate) passed: bool,
    pub(crate) refused_expected: bool,
}

impl Results {
    pub(crate) fn record(&self, runtime: &'static str, case: &Concrete, row: Row) {
        if let Ok(mut rows) = self.rows.lock() {
            rows.insert((runtime, case.id.clone()), row);
        }
    }
}

pub(crate) struct Request {
    /// The bytes (HTTP/1.1) or frames (HTTP/2) to send.
    pub(crate) h1: Vec<u8>,
    pub(crate) h2: H2Request,
    pub(crate) head: bool,
    pub(crate) half_close: bool,
    /// The method as sent (for comparing with what the upstream saw).
    pub(crate) method: String,
}

pub(crate) fn build_request(
    case: &Concrete,
    topology: &Topology,
    pki: &HostilePki,
    jwt_token: Option<&str>,
    resource: &str,
) -> Result<Request> {
    let c = &case.case;
    let port = match c.listener {
        Listener::Mtls => topology.gateway.mtls.port(),
        Listener::Lenient => topology.gateway.lenient.port(),
    };
    let authority = format!("localhost:{port}");
    let path = format!("{PATH_PREFIX}{}{}", case.marker, c.target);
    let fill = |text: &str| -> Vec<u8> {
        let text = text
            .replace("$jwt", jwt_token.unwrap_or("no-token"))
            .replace("$path", &path)
            .replace("$marker", &case.marker)
            .replace("$authority", &authority)
            .replace("$resource", resource)
            .replace(
                "$xfh",
                c.forwarded_host.first().map(String::as_str).unwrap_or(""),
            );
        raw::unescape(&pki.expand(&text))
    };
    let target = match &c.target_raw {
        Some(t) => fill(t),
        None => fill(&path),
    };
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    fields.push((b"x-hostile-case".to_vec(), case.marker.clone().into_bytes()));
    if jwt_token.is_some() {
        for value in &c.authorization {
            fields.push((b"authorization".to_vec(), fill(value)));
        }
    }
    for value in &c.forwarded_host {
        fields.push((b"x-forwarded-host".to_vec(), fill(value)));
    }
    for (name, value) in &c.headers {
        fields.push((fill(name), fill(value)));
    }
    if let Some((name, value, count)) = &c.flood {
        let value = fill(value);
        for n in 0..*count {
            fields.push((fill(&name.replace("{n}", &n.to_string())), value.clone()));
        }
    }
    let body = c.body.as_deref().map(fill);
    let sent_method = match (case.protocol, &c.h1_raw, &c.pseudo) {
        (Protocol::H1, Some(raw_text), _) => {
            let raw_bytes = fill(raw_text);
            let start = raw_bytes
                .iter()
                .position(|b| !b"\r\n".contains(b))
                .unwrap_or(0);
            let line = &raw_bytes[start..];
            let end = line
                .iter()
                .position(|b| b.is_ascii_whitespace())
                .unwrap_or(0);
            String::from_utf8_lossy(&line[..end]).into_owned()
        }
        (Protocol::H2, _, Some(pseudo)) => pseudo
            .iter()
            .find(|(k, _)| k == ":method")
            .map(|(_, v)| String::from_utf8_lossy(&fill(v)).into_owned())
            .unwrap_or_default(),
        _ => String::from_utf8_lossy(&fill(&c.method)).into_owned(),
    };
    // HTTP/1.1
    let h1 = match &c.h1_raw {
        Some(raw_text) => fill(raw_text),
        None => {
            let mut out = Vec::new();
            out.extend(fill(&c.method));
            out.push(b' ');
            out.extend(&target);
            out.push(b' ');
            out.extend(c.h1_version.as_bytes());
            out.extend(b"\r\n");
            if !c.no_host {
                out.extend(format!("host: {authority}\r\n").as_bytes());
            }
            for (name, value) in &fields {
                out.extend(name);
                out.extend(b": ");
                out.extend(value);
                out.extend(b"\r\n");
            }
            match (&body, c.framing) {
                (Some(body), Framing::ContentLength) => {
                    out.extend(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
                    out.extend(body);
                }
                (Some(body), Framing::Chunked) => {
                    out.extend(b"transfer-encoding: chunked\r\n\r\n");
                    out.extend(format!("{:x}\r\n", body.len()).as_bytes());
                    out.extend(body);
                    out.extend(b"\r\n0\r\n\r\n");
                }
                (Some(body), Framing::None) => {
                    out.extend(b"\r\n");
                    out.extend(body);
                }
                (None, _) => out.extend(b"\r\n"),
            }
            out
        }
    };
    // HTTP/2: pseudo-headers, then the same fields with names lower-cased as HTTP/2 requires
    // (a case that wants an upper-case name says so in `pseudo`-free raw names: kept as given).
    let mut h2_fields: Vec<(Vec<u8>, Vec<u8>)> = match &c.pseudo {
        Some(pseudo) => pseudo.iter().map(|(k, v)| (fill(k), fill(v))).collect(),
        None => {
            let mut p = vec![
                (b":method".to_vec(), fill(&c.method)),
                (b":scheme".to_vec(), b"https".to_vec()),
            ];
            if !c.no_host {
                p.push((b":authority".to_vec(), authority.clone().into_bytes()));
            }
            p.push((b":path".to_vec(), target.clone()));
            p
        }
    };
    h2_fields.extend(fields);
    let h2_body = match (&body, c.framing) {
        (Some(body), _) => Some(body.clone()),
        (None, _) => None,
    };
    if let Some(body) = &h2_body
        && c.framing == Framing::ContentLength
        && !c
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        h2_fields.push((
            b"content-length".to_vec(),
            body.len().to_string().into_bytes(),
        ));
    }
    Ok(Request {
        h1,
        h2: H2Request {
            fields: h2_fields,
            body: h2_body,
            leave_open: c.leave_open,
        },
        head: c.method.eq_ignore_ascii_case("HEAD"),
        half_close: c.half_close,
        method: sent_method,
    })
}

/// A connection of either protocol, kept for a follow-up request.
pub(crate) enum Conn {
    H1(H1Conn),
    H2(H2Conn),
}

pub(crate) async fn open(
    topology: &Topology,
    listener: Listener,
    protocol: Protocol,
    identity: Option<&ClientIdentity>,
) -> Result<std::result::Result<Conn, Answer>> {
    let addr = match listener {
        Listener::Mtls => topology.gateway.mtls,
        Listener::Lenient => topology.gateway.lenient,
    };
    let alpn: &[&[u8]] = match protocol {
        Protocol::H1 => &[b"http/1.1"],
        Protocol::H2 => &[b"h2"],
    };
    let config = raw::tls_config(&topology.ca.cert_pem, identity, alpn)?;
    let stream = match raw::connect(addr, config).await? {
        Ok(stream) => stream,
        Err(answer) => return Ok(Err(answer)),
    };
    Ok(match protocol {
        Protocol::H1 => Ok(Conn::H1(H1Conn::new(stream))),
        Protocol::H2 => H2Conn::handshake(stream).await.map(Conn::H2),
    })
}

pub(crate) async fn exchange(conn: &mut Conn, request: &Request) -> Answer {
    match conn {
        Conn::H1(h1) => {
            let sent = h1.send(&request.h1).await;
            if request.half_close {
                h1.shutdown_write().await;
            }
            if let Err(answer) = sent {
                // The server may have answered and closed before reading everything.
                if let Answer::Response(r) = h1.read_response(request.head).await {
                    return Answer::Response(r);
                }
                return answer;
            }
            h1.read_response(request.head).await
        }
        Conn::H2(h2) => match h2.send(&request.h2).await {
            Ok(stream) => h2.read_response(stream).await,
            Err(answer) => answer,
        },
    }
}

pub(crate) fn observe(answer: &Answer) -> Observed {
    match answer {
        Answer::Response(r) => Observed::Answer {
            status: r.status,
            code: r.header("x-azgate-error"),
            from_upstream: r.header("x-fake-azure").is_some(),
        },
        Answer::Closed(why) => Observed::Closed(why.clone()),
        Answer::TlsRefused(why) => Observed::TlsRefused(why.clone()),
        Answer::TimedOut => Observed::TimedOut,
    }
}

/// Checks an azgate refusal's shape: JSON body with the code and a message.
pub(crate) fn check_refusal_body(response: &Response, code: &str) -> Result<()> {
    let content_type = response.header("content-type").unwrap_or_default();
    ensure!(
        content_type.starts_with("application/json"),
        "content-type {content_type:?} for {code}"
    );
    let json: serde_json::Value = serde_json::from_slice(&response.body).with_context(|| {
        format!(
            "error body is not JSON: {}",
            String::from_utf8_lossy(&response.body)
        )
    })?;
    ensure!(json["error"]["code"] == code, "error body {json}");
    ensure!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("azgate: ")),
        "error message missing: {json}"
    );
    Ok(())
}

pub(crate) fn matches(expect: &Expect, answer: &Answer) -> bool {
    match (expect, answer) {
        (Expect::Forwarded, Answer::Response(r)) => {
            r.status == 200 && r.header("x-fake-azure").is_some()
        }
        (Expect::Refused { status, code }, Answer::Response(r)) => {
            r.status == *status
                && r.header("x-azgate-error").as_deref() == Some(code.as_str())
                && check_refusal_body(r, code).is_ok()
        }
        (Expect::Plain { status, class }, Answer::Response(r)) => {
            let status_ok = if *class {
                r.status / 100 == status / 100
            } else {
                r.status == *status
            };
            status_ok && r.header("x-azgate-error").is_none() && r.header("x-fake-azure").is_none()
        }
        (Expect::Closed, Answer::Closed(_)) => true,
        (Expect::TlsRefused, Answer::TlsRefused(_)) => true,
        _ => false,
    }
}

pub(crate) fn seen_for(topology: &Topology, marker: &str) -> Vec<azgate_tests::upstream::Seen> {
    let needle = format!("{PATH_PREFIX}{marker}");
    topology
        .azure
        .seen()
        .into_iter()
        .filter(|s| {
            s.path.contains(&needle)
                || s.headers
                    .iter()
                    .any(|(k, v)| k == "x-hostile-case" && v.as_str() == marker)
        })
        .collect()
}

pub(crate) fn check_forwarded(
    topology: &Topology,
    suite: &Suite,
    case: &Concrete,
    marker: &str,
    jwt_token: Option<&str>,
    resource: &str,
    sent_method: &str,
) -> Result<()> {
    let seen = seen_for(topology, marker);
    ensure!(
        seen.len() == 1,
        "upstream saw {} requests for this case, expected 1",
        seen.len()
    );
    let got = &seen[0];
    let expected = case.case.upstream.clone().unwrap_or_default();
    let method = expected
        .method
        .clone()
        .unwrap_or_else(|| sent_method.to_string());
    ensure!(got.method == method, "upstream method {:?}", got.method);
    let marked_path = format!("{PATH_PREFIX}{marker}{}", case.case.target);
    let path = expected
        .path
        .as_deref()
        .map(|p| p.replace("$path", &marked_path))
        .unwrap_or(marked_path);
    ensure!(
        got.path == path,
        "upstream path {:?}, expected {path:?}",
        got.path
    );
    let identity = suite
        .identities
        .get(&expected.identity)
        .cloned()
        .unwrap_or(expected.identity.clone());
    got.check_granted(&expected.host, resource, &identity, jwt_token)?;
    Ok(())
}

pub(crate) fn client_identity(minted: &Minted) -> Result<ClientIdentity> {
    Ok(ClientIdentity {
        chain: minted.chain_der.clone(),
        key: minted.key.client_key()?,
    })
}

/// An allowed request (the corpus' reference shape) on `conn`, or a new connection.
pub(crate) async fn follow_up(
    topology: &Topology,
    pki: &HostilePki,
    suite: &Suite,
    case: &Concrete,
    conn: Option<Conn>,
) -> Result<()> {
    let minted = pki.mint(&CertSpec::default())?;
    let marker = format!("{}-next", case.marker);
    let resource = format!("api://hostile-{marker}");
    let token = make_token(&JwtSpec::default(), pki, Some(&minted), &resource)?;
    let reference = Concrete {
        marker: marker.clone(),
        case: serde_json::from_value(serde_json::json!({
            "name": "follow-up", "expect": "200",
        }))?,
        ..case.clone()
    };
    let request = build_request(&reference, topology, pki, Some(&token), &resource)?;
    let mut conn = match conn {
        Some(conn) => conn,
        None => match open(
            topology,
            Listener::Mtls,
            case.protocol,
            Some(&client_identity(&minted)?),
        )
        .await?
        {
            Ok(conn) => conn,
            Err(answer) => bail!("the follow-up could not connect: {answer:?}"),
        },
    };
    let answer = raw::with_deadline(CASE_DEADLINE, exchange(&mut conn, &request)).await;
    ensure!(
        matches(&Expect::Forwarded, &answer),
        "the next request was not served: {}",
        observe(&answer).describe()
    );
    check_forwarded(
        topology,
        suite,
        &reference,
        &marker,
        Some(&token),
        &resource,
        "GET",
    )
}

pub(crate) async fn run_case(
    shared: &Shared,
    suite: &Suite,
    case: &Concrete,
    observed: &mut Option<Observed>,
) -> Result<()> {
    let (topology, pki) = shared.get().await?;
    let runtime = shared.runtime.name();
    let minted = match &case.cert {
        Some(spec) => Some(pki.mint(spec)?),
        None => None,
    };
    let resource = case
        .case
        .jwt
        .as_ref()
        .and_then(|j| j.claims.get("resource"))
        .and_then(|r| r.as_str())
        .map(|r| {
            match r
                .strip_prefix("$pad:")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) => "x".repeat(n),
                None => r.to_string(),
            }
        })
        .unwrap_or_else(|| format!("api://hostile-{}", case.marker));
    let token = match &case.case.jwt {
        Some(spec) => Some(make_token(spec, pki, minted.as_deref(), &resource)?),
        None => None,
    };
    let request = build_request(case, topology, pki, token.as_deref(), &resource)?;
    let identity = minted.as_deref().map(client_identity).transpose()?;
    let imds_before = topology.imds_calls_for(&resource);
    let attempt = tokio::time::timeout(CASE_DEADLINE, async {
        match open(
            topology,
            case.case.listener,
            case.protocol,
            identity.as_ref(),
        )
        .await
        {
            Ok(Ok(mut conn)) => {
                let answer = exchange(&mut conn, &request).await;
                (answer, Some(conn))
            }
            Ok(Err(answer)) => (answer, None),
            Err(error) => (Answer::Closed(format!("client error: {error:#}")), None),
        }
    })
    .await;
    let (answer, conn) = attempt.unwrap_or((Answer::TimedOut, None));
    *observed = Some(observe(&answer));
    let described = observe(&answer).describe();
    if let Answer::Response(r) = &answer {
        ensure!(
            r.status < 500,
            "a 5xx: {described}; body: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    ensure!(
        !matches!(answer, Answer::TimedOut),
        "no answer within {CASE_DEADLINE:?} (a hang)"
    );
    let (expected, pin) = case.expected(runtime);
    let hit = expected.iter().find(|e| matches(e, &answer));
    let Some(hit) = hit else {
        let mut body = match &answer {
            Answer::Response(r) => String::from_utf8_lossy(&r.body).into_owned(),
            _ => String::new(),
        };
        let seen = seen_for(topology, &case.marker);
        if !seen.is_empty() {
            let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
            body.push_str(&format!("; the upstream saw {paths:?}"));
        }
        match pin {
            Some(reason) => bail!(
                "the pin ({reason}) no longer reproduces: expected {}, got {described}; body: {body}",
                case_expect_text(&expected)
            ),
            None => bail!(
                "expected {}, got {described}; body: {body}",
                case_expect_text(&expected)
            ),
        }
    };
    if *hit == Expect::Forwarded {
        check_forwarded(
            topology,
            suite,
            case,
            &case.marker,
            token.as_deref(),
            &resource,
            &request.method,
        )?;
    } else {
        // The upstream answers only after recording, but a gateway could send a request
        // upstream and still answer the client itself: give it a moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = seen_for(topology, &case.marker);
        ensure!(
            seen.is_empty(),
            "refused ({described}) but the upstream saw it: {:?}",
            seen.iter()
                .map(|s| (
                    s.method.clone(),
                    s.path.clone(),
                    s.header("authorization")
                        .map(|a| a.chars().take(24).collect::<String>())
                ))
                .collect::<Vec<_>>()
        );
        // A refusal by the filter comes before any token fetch. A codec or the gateway that
        // fails on the body after the filter allowed the headers (the body is read after the
        // decision, so a refused caller's body is never buffered) may leave a fetched, never
        // forwarded, token.
        if matches!(hit, Expect::Refused { code, .. } if !GATEWAY_BODY_REFUSALS.contains(&code.as_str()))
        {
            let made = topology.imds_calls_for(&resource) - imds_before;
            ensure!(
                made == 0,
                "refused ({described}) but made {made} IMDS calls"
            );
        }
    }
    if case.case.then_served {
        // The same connection (so the same gateway worker) when it is still open and carries
        // the reference certificate; a new one otherwise.
        // Raw HTTP/1.1 may leave unread bytes behind (a smuggled tail): then a new connection.
        let reference_cert = case.cert.as_ref() == Some(&CertSpec::default())
            && case.case.listener == Listener::Mtls
            && !(case.protocol == Protocol::H1 && case.case.h1_raw.is_some());
        let reusable = match conn.filter(|_| reference_cert) {
            Some(Conn::H1(mut h1)) => match &answer {
                Answer::Response(r) if r.keep_alive && !h1.closed().await => Some(Conn::H1(h1)),
                _ => None,
            },
            Some(Conn::H2(h2)) if h2.usable() => Some(Conn::H2(h2)),
            _ => None,
        };
        follow_up(topology, pki, suite, case, reusable).await?;
    }
    Ok(())
}

pub(crate) fn case_expect_text(expected: &[Expect]) -> String {
    expected
        .iter()
        .map(|e| match e {
            Expect::Forwarded => "200 (forwarded)".to_string(),
            Expect::Refused { status, code } => format!("{status} {code}"),
            Expect::Plain {
                status,
                class: false,
            } => format!("{status} -"),
            Expect::Plain {
                status,
                class: true,
            } => format!("{}xx -", status / 100),
            Expect::Closed => "closed".into(),
            Expect::TlsRefused => "tls_refused".into(),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}
