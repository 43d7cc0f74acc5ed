#![allow(clippy::unwrap_used, reason = "tests fail on purpose")]

use super::*;

const TIMEOUT: Duration = Duration::from_secs(10);

fn guard() -> (Http1Guard<()>, Rc<Verdicts>) {
    let verdicts = Rc::new(Verdicts::default());
    (Http1Guard::new((), verdicts.clone(), TIMEOUT), verdicts)
}

/// Feeds `input` whole and byte by byte; both must give the same output and verdicts, which
/// are returned (verdicts as codes, `""` for a head let through).
fn run(input: &[u8]) -> (Vec<u8>, Vec<&'static str>) {
    let mut results = Vec::new();
    for split in [input.len().max(1), 1, 7] {
        let (mut guard, verdicts) = guard();
        for piece in input.chunks(split) {
            guard.feed(piece);
        }
        let codes: Vec<&'static str> = verdicts
            .0
            .borrow()
            .iter()
            .map(|v| v.as_ref().map_or("", |e| e.code()))
            .collect();
        results.push((guard.out.clone(), codes));
    }
    assert!(
        results.windows(2).all(|w| w[0] == w[1]),
        "split reads change the outcome: {results:?}"
    );
    results.remove(0)
}

fn refused_after(prefix: &[u8]) -> Vec<u8> {
    [prefix, STAND_IN].concat()
}

#[tokio::test]
async fn pipelined_requests_pass_unchanged_with_bodies_that_look_like_heads() {
    let looks_like_a_head =
        "GET /smuggled HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: x\r\n\r\n";
    let input = format!(
        "GET /a HTTP/1.1\r\nhost: x\r\n\r\n\
         POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{looks_like_a_head}\
         POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
         {:x};ext=1\r\n{looks_like_a_head}\r\n3 \r\nabc\r\n\
         0\r\ntrailer: v\r\n\r\n\
         \r\nGET /d HTTP/1.1\nhost: x\n\n",
        looks_like_a_head.len(),
        looks_like_a_head.len(),
    );
    let (out, verdicts) = run(input.as_bytes());
    assert_eq!(String::from_utf8_lossy(&out), input);
    assert_eq!(verdicts, ["", "", "", ""]);
}

#[tokio::test]
async fn conflicting_or_unreadable_framing_is_refused_before_hyper_sees_it() {
    let first: &[u8] = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n";
    for (head, code) in [
        (
            &b"POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            "BadRequest",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "BadRequest",
        ),
        (
            b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
            "BadRequest",
        ),
        (
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n",
            "BadRequest",
        ),
        (
            b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
            "BadRequest",
        ),
        (
            b"POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "BadRequest",
        ),
        (
            b"POST / HTTP/1.1\r\ncontent-length: 5, 5\r\n\r\n",
            "BadRequest",
        ),
        (
            b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
            "BadRequest",
        ),
        (
            b"POST / HTTP/1.1\r\ncontent-length: 99999999999999999999999\r\n\r\n",
            "BadRequest",
        ),
    ] {
        let input = [first, head, b"hello", b"GET /after HTTP/1.1\r\n\r\n"].concat();
        let (out, verdicts) = run(&input);
        assert_eq!(
            out,
            refused_after(first),
            "{}",
            String::from_utf8_lossy(head)
        );
        assert_eq!(verdicts, ["", code], "{}", String::from_utf8_lossy(head));
    }
    // The same length twice is one length.
    let (_, verdicts) = run(b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx");
    assert_eq!(verdicts, [""]);
}

fn with_fields(fields: usize) -> Vec<u8> {
    let mut head = b"GET / HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..fields {
        head.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

#[tokio::test]
async fn header_blocks_over_envoys_limits_are_refused() {
    // Envoy takes 95 fields besides Host (99 with the four pseudo-headers) and refuses 96.
    assert_eq!(run(&with_fields(95)).1, [""]);
    assert_eq!(
        run(&with_fields(96)),
        (STAND_IN.to_vec(), vec!["RequestHeaderFieldsTooLarge"])
    );
    let big = |n: usize| {
        [
            &b"GET / HTTP/1.1\r\nx-big: "[..],
            &vec![b'a'; n],
            b"\r\n\r\n",
        ]
        .concat()
    };
    let limit = MAX_REQUEST_HEADERS_BYTES as usize;
    assert_eq!(run(&big(limit - 100)).1, [""]);
    assert_eq!(
        run(&big(limit)),
        (STAND_IN.to_vec(), vec!["RequestHeaderFieldsTooLarge"])
    );
    // Refused as soon as it is over, without waiting for its end.
    let (mut guard, verdicts) = guard();
    guard.feed(&big(limit + 10)[..limit + 5]);
    assert_eq!(guard.out, STAND_IN);
    assert_eq!(
        verdicts.next().unwrap_err().code(),
        "RequestHeaderFieldsTooLarge"
    );
}

#[tokio::test]
async fn http2_is_passed_through_and_a_broken_chunk_stops_the_guard_as_it_stops_hyper() {
    let h2 = [H2_PREFACE, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"].concat();
    assert_eq!(run(&h2), (h2.clone(), vec![]));
    // A near miss of the preface is HTTP/1.1 (hyper answers it).
    assert_eq!(run(b"PRI * HTTP/1.1\r\n\r\n").1, [""]);
    let broken: &[u8] = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello!!\r\n\
        GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
    assert_eq!(run(broken), (broken.to_vec(), vec![""]));
}

#[tokio::test]
async fn the_verdict_of_a_request_the_guard_did_not_see_is_a_refusal() {
    let (_, verdicts) = guard();
    assert_eq!(verdicts.next().unwrap_err().code(), "BadRequest");
}

#[tokio::test(start_paused = true)]
async fn a_head_still_arriving_after_the_timeout_is_answered_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client, server) = tokio::io::duplex(4096);
    let verdicts = Rc::new(Verdicts::default());
    let mut guarded = Http1Guard::new(server, verdicts.clone(), TIMEOUT);
    // A whole request passes at once; the next head is trickled.
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET /slow HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut first = vec![0u8; 27];
    guarded.read_exact(&mut first).await.unwrap();
    assert_eq!(first, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
    let read = async {
        let mut rest = vec![0u8; STAND_IN.len()];
        guarded.read_exact(&mut rest).await.unwrap();
        // Nothing after the stand-in, but no end of the stream either (hyper would drop its
        // answer): hyper closes after answering it.
        let mut more = [0u8; 1];
        let after = tokio::time::timeout(Duration::from_secs(60), guarded.read(&mut more)).await;
        assert!(after.is_err(), "{after:?}");
        rest
    };
    // Kept open: the end of the stream must come from the guard.
    let trickle = async {
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            client.write_all(b"x").await.unwrap();
        }
        client
    };
    let (rest, _client) = tokio::join!(read, trickle);
    assert_eq!(rest, STAND_IN);
    assert!(verdicts.next().is_ok());
    assert_eq!(verdicts.next().unwrap_err().code(), "RequestTimeout");
}
