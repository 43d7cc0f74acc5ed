//! The bearer tokens of the cases: honest, forged and malformed JWS.

use super::*;

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// `$now`, `$now_plus:N`, `$now_minus:N` and `$resource` in JSON text.
pub(crate) fn time_placeholders(text: &str, resource: &str) -> String {
    let mut out = text.replace("$resource", resource);
    for (tag, sign) in [("$now_plus:", 1i64), ("$now_minus:", -1i64)] {
        while let Some(start) = out.find(tag) {
            let digits: String = out[start + tag.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let offset: i64 = digits.parse().unwrap_or_default();
            out.replace_range(
                start..start + tag.len() + digits.len(),
                &(now() + sign * offset).to_string(),
            );
        }
    }
    out.replace("$now", &now().to_string())
}

pub(crate) fn natural_alg(key: &HostileKey) -> &'static str {
    match key {
        HostileKey::P256(_) => "ES256",
        HostileKey::P384(_) => "ES384",
        HostileKey::Rsa(_) => "RS256",
        HostileKey::Ed25519 { .. } => "EdDSA",
    }
}

pub(crate) fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut block = if key.len() > 64 {
        Sha256::digest(key).to_vec()
    } else {
        key.to_vec()
    };
    block.resize(64, 0);
    let inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    let outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    let mut hasher = Sha256::new();
    hasher.update(&inner);
    hasher.update(message);
    let inner_hash = hasher.finalize();
    let mut hasher = Sha256::new();
    hasher.update(&outer);
    hasher.update(inner_hash);
    hasher.finalize().to_vec()
}

/// The P-256 curve order n, big-endian.
pub(crate) const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// The signature a case asks for over `input`:
/// `valid` (the key's own algorithm), `high_s` / `low_s` (ES256 with s above / below n/2),
/// `der` (ES256 as DER instead of r‖s), `ps256` (RSA-PSS), `hs256:<secret>` (HMAC with the
/// certificate's `spki_pem`, `spki_der`, `cert_pem`, `cert_der` or `empty` as the secret),
/// `empty`, `zeros:N`, `flip`, `truncate`, `extend`, `swap_rs`, `r_zero`, `s_zero`, `r_n`,
/// `other_input`.
pub(crate) fn signature(
    kind: &str,
    key: &HostileKey,
    cert: Option<&Minted>,
    input: &[u8],
) -> Result<Vec<u8>> {
    use p256::ecdsa::signature::Signer;
    let valid = |message: &[u8]| -> Result<Vec<u8>> {
        if let Some(sig) = key.sign_eddsa(message) {
            return Ok(sig);
        }
        let jwt_key = key
            .jwt_key()
            .ok_or_else(|| anyhow!("no JWT signing for this key"))?;
        Ok(match jwt_key {
            azgate_tests::pki::PrivateKey::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(message);
                sig.to_bytes().to_vec()
            }
            azgate_tests::pki::PrivateKey::P384(k) => {
                let sig: p384::ecdsa::Signature = k.sign(message);
                sig.to_bytes().to_vec()
            }
            azgate_tests::pki::PrivateKey::Rsa(k) => {
                k.sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(message))?
            }
        })
    };
    let p256_key = || match key {
        HostileKey::P256(k) => Ok(k.clone()),
        _ => Err(anyhow!("signature {kind} needs a P-256 key")),
    };
    Ok(match kind {
        "valid" => valid(input)?,
        "high_s" | "low_s" => {
            let sig: p256::ecdsa::Signature = p256_key()?.sign(input);
            let low = sig.normalize_s().unwrap_or(sig);
            if kind == "low_s" {
                low.to_bytes().to_vec()
            } else {
                let (r, s) = low.split_scalars();
                let high_s = -*s.as_ref();
                p256::ecdsa::Signature::from_scalars(r.to_bytes(), high_s.to_bytes())?
                    .to_bytes()
                    .to_vec()
            }
        }
        "der" => {
            let sig: p256::ecdsa::Signature = p256_key()?.sign(input);
            sig.to_der().as_bytes().to_vec()
        }
        "ps256" => {
            use rsa::signature::{RandomizedSigner, SignatureEncoding};
            let HostileKey::Rsa(k) = key else {
                bail!("ps256 needs an RSA key");
            };
            rsa::pss::BlindedSigningKey::<Sha256>::new((**k).clone())
                .try_sign_with_rng(&mut rand_core::OsRng, input)?
                .to_vec()
        }
        secret if secret.starts_with("hs256:") => {
            let cert = cert.ok_or_else(|| anyhow!("{kind} needs a certificate"))?;
            let spki = cert.key.spki_der()?;
            let der = cert
                .chain_der
                .first()
                .cloned()
                .ok_or_else(|| anyhow!("empty chain"))?;
            let pem = |label: &str, der: &[u8]| {
                let body = STANDARD.encode(der);
                let lines: Vec<&str> = body
                    .as_bytes()
                    .chunks(64)
                    .filter_map(|c| std::str::from_utf8(c).ok())
                    .collect();
                format!(
                    "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
                    lines.join("\n")
                )
            };
            let secret = match &secret["hs256:".len()..] {
                "spki_pem" => pem("PUBLIC KEY", &spki).into_bytes(),
                "spki_der" => spki,
                "cert_pem" => cert.cert_pem.clone().into_bytes(),
                "cert_der" => der,
                "empty" => Vec::new(),
                other => bail!("unknown HMAC secret {other:?}"),
            };
            hmac_sha256(&secret, input)
        }
        "empty" => Vec::new(),
        zeros if zeros.starts_with("zeros:") => vec![0; zeros["zeros:".len()..].parse()?],
        "flip" => {
            let mut sig = valid(input)?;
            if let Some(last) = sig.last_mut() {
                *last ^= 0x01;
            }
            sig
        }
        "truncate" => {
            let mut sig = valid(input)?;
            sig.pop();
            sig
        }
        "extend" => {
            let mut sig = valid(input)?;
            sig.push(0);
            sig
        }
        "swap_rs" => {
            let sig = valid(input)?;
            let (r, s) = sig.split_at(sig.len() / 2);
            [s, r].concat()
        }
        "r_zero" | "s_zero" | "r_n" => {
            let sig = valid(input)?;
            let (r, s) = sig.split_at(32);
            match kind {
                "r_zero" => [&[0u8; 32][..], s].concat(),
                "s_zero" => [r, &[0u8; 32][..]].concat(),
                _ => [&P256_ORDER[..], s].concat(),
            }
        }
        "other_input" => valid(b"eyJhbGciOiJFUzI1NiJ9.e30")?,
        other => bail!("unknown signature kind {other:?}"),
    })
}

pub(crate) fn attacker_jwk(key: &HostileKey) -> Result<serde_json::Value> {
    let HostileKey::P256(k) = key else {
        bail!("the attacker key is P-256");
    };
    let point = k.verifying_key().to_encoded_point(false);
    let x = point.x().ok_or_else(|| anyhow!("no x"))?;
    let y = point.y().ok_or_else(|| anyhow!("no y"))?;
    Ok(serde_json::json!({
        "kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
    }))
}

/// The case's bearer token.
pub(crate) fn make_token(
    spec: &JwtSpec,
    pki: &HostilePki,
    cert: Option<&Minted>,
    resource: &str,
) -> Result<String> {
    let key = match (spec.signer.as_deref(), cert) {
        (None | Some("cert"), Some(cert)) => cert.key.clone(),
        (None | Some("cert") | Some("other"), None) | (Some("other"), _) => key_for("p256:other")?,
        (Some("attacker"), _) => key_for("p256:attacker")?,
        (Some("other_rsa"), _) => key_for("rsa2048:other")?,
        (Some(other), _) => bail!("unknown signer {other:?}"),
    };
    let attacker_cert = pki.attacker()?;
    let alg = spec
        .alg
        .clone()
        .unwrap_or_else(|| natural_alg(&key).to_string());
    let header_bytes = match &spec.header_raw {
        Some(raw_text) => raw::unescape(&pki.expand(&raw_text.replace("$alg", natural_alg(&key)))),
        None => {
            let mut header = serde_json::Map::new();
            header.insert("alg".into(), alg.clone().into());
            header.insert("typ".into(), "JWT".into());
            for (name, value) in &spec.header {
                let value = match value.as_str() {
                    Some("$attacker_jwk") => attacker_jwk(&attacker_cert.key)?,
                    Some("$attacker_x5c") => {
                        serde_json::json!([STANDARD.encode(&attacker_cert.chain_der[0])])
                    }
                    Some("$cert_x5c") => serde_json::json!([STANDARD.encode(
                        cert.and_then(|c| c.chain_der.first())
                            .ok_or_else(|| anyhow!("$cert_x5c needs a certificate"))?
                    )]),
                    _ => value.clone(),
                };
                if value.is_null() {
                    header.remove(name);
                } else {
                    header.insert(name.clone(), value);
                }
            }
            serde_json::Value::Object(header).to_string().into_bytes()
        }
    };
    let payload_bytes = match &spec.claims_raw {
        Some(raw_text) => raw::unescape(&pki.expand(&time_placeholders(raw_text, resource))),
        None => {
            let mut claims = serde_json::Map::new();
            claims.insert("resource".into(), resource.into());
            claims.insert("tid".into(), "00000000-0000-0000-0000-00000000beef".into());
            for (name, value) in &spec.claims {
                match value {
                    serde_json::Value::Null => {
                        claims.remove(name);
                    }
                    serde_json::Value::String(s) if s.starts_with("$pad:") => {
                        let n: usize = s["$pad:".len()..].parse()?;
                        claims.insert(name.clone(), "x".repeat(n).into());
                    }
                    other => {
                        claims.insert(name.clone(), other.clone());
                    }
                }
            }
            if let Some(offset) = spec.exp_offset_s {
                claims.insert("exp".into(), (now() + offset).into());
            }
            if let Some(offset) = spec.nbf_offset_s {
                claims.insert("nbf".into(), (now() + offset).into());
            }
            let mut text = serde_json::Value::Object(claims).to_string();
            for (name, json) in &spec.claims_json {
                text.pop();
                text.push_str(&format!(
                    ",{}:{}}}",
                    serde_json::Value::String(name.clone()),
                    time_placeholders(json, resource)
                ));
            }
            text.into_bytes()
        }
    };
    let h = URL_SAFE_NO_PAD.encode(&header_bytes);
    let p = URL_SAFE_NO_PAD.encode(&payload_bytes);
    let input = format!("{h}.{p}");
    let sig = signature(
        spec.signature.as_deref().unwrap_or("valid"),
        &key,
        cert,
        input.as_bytes(),
    )?;
    let template = spec.token.as_deref().unwrap_or("$h.$p.$s");
    // A padded variant that needs no padding would be the valid token under another name.
    for (placeholder, len) in [
        ("$h_pad", header_bytes.len()),
        ("$p_pad", payload_bytes.len()),
        ("$s_pad", sig.len()),
    ] {
        ensure!(
            !template.contains(placeholder) || len % 3 != 0,
            "{placeholder}: {len} bytes need no base64 padding; make the case's part longer"
        );
    }
    Ok(template
        .replace("$h_pad", &URL_SAFE.encode(&header_bytes))
        .replace("$p_pad", &URL_SAFE.encode(&payload_bytes))
        .replace("$s_pad", &URL_SAFE.encode(&sig))
        .replace("$s_std", &STANDARD.encode(&sig))
        .replace("$h", &h)
        .replace("$p", &p)
        .replace("$s", &URL_SAFE_NO_PAD.encode(&sig)))
}

pub(crate) fn key_for(choice: &str) -> Result<HostileKey> {
    azgate_tests::hostile_pki::shared_key(&KeyChoice(choice.into()))
}
