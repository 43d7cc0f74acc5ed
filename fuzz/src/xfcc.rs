//! A model of `x-forwarded-client-cert` values for structured fuzzing: elements of (key, value)
//! pairs around the real fixture certificates, rendered to text, with what the contract says
//! the filter must answer when the rendering is unambiguous.
//!
//! Contract: exactly one element, exactly one `Cert=`, at most one of every key (`By`, `Hash`,
//! `Cert`, `Chain`, `Subject`, `URI`, `DNS`), unknown keys refused, `Hash=` (when present) the
//! SHA-256 hex of the certificate.

use arbitrary::Arbitrary;

use crate::{Fixtures, Which, pem_of, url_encode};

/// The keys Envoy writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Key {
    /// `By`.
    By,
    /// `Hash`.
    Hash,
    /// `Cert`.
    Cert,
    /// `Chain`.
    Chain,
    /// `Subject`.
    Subject,
    /// `URI`.
    Uri,
    /// `DNS`.
    Dns,
}

impl Key {
    fn name(self) -> &'static str {
        match self {
            Self::By => "By",
            Self::Hash => "Hash",
            Self::Cert => "Cert",
            Self::Chain => "Chain",
            Self::Subject => "Subject",
            Self::Uri => "URI",
            Self::Dns => "DNS",
        }
    }
}

/// How a key is spelled.
#[derive(Clone, Debug, Arbitrary)]
pub enum KeyText {
    /// As Envoy writes it.
    Canonical(Key),
    /// Lower case (the contract does not say whether `cert` is `Cert`).
    Lower(Key),
    /// With spaces around it.
    Spaced(Key),
    /// Anything.
    Other(String),
}

/// A value.
#[derive(Clone, Debug, Arbitrary)]
pub enum Value {
    /// A fixture certificate, URL-encoded, optionally quoted.
    Cert { which: Which, quoted: bool },
    /// A fixture certificate with one DER byte replaced, URL-encoded and quoted.
    MutatedCert { which: Which, at: u16, byte: u8 },
    /// A fixture certificate as raw PEM (not URL-encoded), quoted.
    RawPem { which: Which },
    /// The CA certificate (no Teleport subject), URL-encoded and quoted.
    Ca,
    /// The SHA-256 hex of a fixture certificate's DER.
    HashOf(Which),
    /// A fixture hash with its case changed or one digit replaced.
    HashVariant {
        which: Which,
        upper: bool,
        at: u8,
        digit: u8,
    },
    /// What a gateway writes for a SAN holding `x;Cert="<PEM>"` without quoting: a second
    /// `Cert` key after this pair.
    Injected { which: Which, prefix: String },
    /// A quoted string.
    Quoted(String),
    /// An unquoted string.
    Raw(String),
}

/// One XFCC header value: elements joined by `,`, pairs by `;`.
#[derive(Clone, Debug, Arbitrary)]
pub struct Xfcc {
    /// The elements.
    pub elements: Vec<Vec<(KeyText, Value)>>,
}

/// What the contract says about a rendered value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Must be refused.
    Refuse,
    /// Must be accepted as this fixture certificate.
    Accept(Which),
    /// The model cannot tell (ambiguous text, a mutated certificate, a key spelling the contract
    /// does not fix).
    Unknown,
}

/// What a certificate value stands for in the model.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CertIs {
    Fixture(Which),
    /// Cannot be a usable certificate (text, the CA).
    Unusable,
    /// A changed DER: may parse, but its hash is not the fixture's.
    Mutated,
    /// The fixture's DER in a form the contract does not fix (PEM not URL-encoded).
    Unfixed,
}

/// Characters that change the structure of an unquoted value.
fn clean_unquoted(s: &str) -> bool {
    !s.contains(['"', ',', ';', '=', '\\']) && s.trim() == s
}

fn clean_quoted(s: &str) -> bool {
    !s.contains(['"', '\\'])
}

impl Xfcc {
    /// The header value and the contract's expectation.
    pub fn render(&self, fx: &Fixtures) -> (String, Expect) {
        let mut ambiguous = false;
        let mut refuse = self.elements.len() != 1;
        let mut elements = Vec::new();
        // (key, what its value stands for) for the single element's effective pairs.
        let mut pairs: Vec<(Key, Option<CertIs>, Option<Option<Which>>)> = Vec::new();
        for element in &self.elements {
            let mut parts = Vec::new();
            for (key, value) in element {
                let key_known = match key {
                    KeyText::Canonical(k) => {
                        parts.push(format!("{}=", k.name()));
                        Some(*k)
                    }
                    KeyText::Lower(k) => {
                        ambiguous = true;
                        parts.push(format!("{}=", k.name().to_ascii_lowercase()));
                        Some(*k)
                    }
                    KeyText::Spaced(k) => {
                        ambiguous = true;
                        parts.push(format!(" {} =", k.name()));
                        Some(*k)
                    }
                    KeyText::Other(name) => {
                        let known = ["by", "hash", "cert", "chain", "subject", "uri", "dns"];
                        if name.is_empty()
                            || !name.bytes().all(|b| b.is_ascii_alphanumeric())
                            || known.contains(&name.to_ascii_lowercase().as_str())
                        {
                            ambiguous = true;
                        } else {
                            // An unknown key is refused.
                            refuse = true;
                        }
                        parts.push(format!("{name}="));
                        None
                    }
                };
                let part = parts.last_mut().expect("a key was just pushed");
                let (cert_is, hash_is) = match value {
                    Value::Cert { which, quoted } => {
                        let encoded = url_encode(fx.cert(*which).pem);
                        if *quoted {
                            part.push_str(&format!("\"{encoded}\""));
                        } else {
                            part.push_str(&encoded);
                        }
                        (CertIs::Fixture(*which), None)
                    }
                    Value::MutatedCert { which, at, byte } => {
                        let mut der = fx.cert(*which).der.clone();
                        let i = usize::from(*at) % der.len();
                        let unchanged = der[i] == *byte;
                        der[i] = *byte;
                        part.push_str(&format!("\"{}\"", url_encode(&pem_of(&der))));
                        if unchanged {
                            (CertIs::Fixture(*which), None)
                        } else {
                            (CertIs::Mutated, None)
                        }
                    }
                    Value::RawPem { which } => {
                        part.push_str(&format!("\"{}\"", fx.cert(*which).pem));
                        // Not URL-encoded: whether it is read as is, the contract does not say.
                        (CertIs::Unfixed, None)
                    }
                    Value::Ca => {
                        part.push_str(&format!("\"{}\"", url_encode(crate::CA_CERT_PEM)));
                        (CertIs::Unusable, None)
                    }
                    Value::HashOf(which) => {
                        part.push_str(&fx.cert(*which).hash_hex);
                        (CertIs::Unusable, Some(Some(*which)))
                    }
                    Value::HashVariant {
                        which,
                        upper,
                        at,
                        digit,
                    } => {
                        let mut hash = fx.cert(*which).hash_hex.clone().into_bytes();
                        let i = usize::from(*at) % hash.len();
                        let digit = b"0123456789abcdef"[usize::from(*digit % 16)];
                        let same = hash[i] == digit;
                        hash[i] = digit;
                        let mut hash = String::from_utf8(hash).expect("hex is ASCII");
                        if *upper {
                            hash = hash.to_ascii_uppercase();
                            // Whether hex case matters, the contract does not say.
                            ambiguous = true;
                        }
                        part.push_str(&hash);
                        (CertIs::Unusable, Some(same.then_some(*which)))
                    }
                    Value::Injected { which, prefix } => {
                        if !clean_unquoted(prefix) {
                            ambiguous = true;
                        }
                        part.push_str(&format!(
                            "{prefix};Cert=\"{}\"",
                            url_encode(fx.cert(*which).pem)
                        ));
                        if let Some(k) = key_known {
                            pairs.push((k, Some(CertIs::Unusable), None));
                        }
                        // The injected pair is a second, real `Cert` key.
                        pairs.push((Key::Cert, Some(CertIs::Fixture(*which)), None));
                        continue;
                    }
                    Value::Quoted(s) => {
                        if !clean_quoted(s) || (s.is_empty() && key_known == Some(Key::Hash)) {
                            ambiguous = true;
                        }
                        part.push_str(&format!("\"{s}\""));
                        (CertIs::Unusable, None)
                    }
                    Value::Raw(s) => {
                        if !clean_unquoted(s) || (s.is_empty() && key_known == Some(Key::Hash)) {
                            ambiguous = true;
                        }
                        part.push_str(s);
                        (CertIs::Unusable, None)
                    }
                };
                if let Some(k) = key_known {
                    pairs.push((k, Some(cert_is), hash_is));
                }
            }
            elements.push(parts.join(";"));
        }
        let text = elements.join(",");
        if ambiguous {
            return (text, Expect::Unknown);
        }
        if refuse {
            return (text, Expect::Refuse);
        }
        let mut seen = Vec::new();
        for (key, _, _) in &pairs {
            if seen.contains(key) {
                return (text, Expect::Refuse);
            }
            seen.push(*key);
        }
        let certs: Vec<CertIs> = pairs
            .iter()
            .filter(|(k, _, _)| *k == Key::Cert)
            .filter_map(|(_, c, _)| *c)
            .collect();
        let cert = match certs.as_slice() {
            [one] => *one,
            _ => return (text, Expect::Refuse),
        };
        let hash = pairs
            .iter()
            .find(|(k, _, _)| *k == Key::Hash)
            .map(|(_, _, h)| h.flatten());
        match (cert, hash) {
            (CertIs::Unusable, _) | (CertIs::Mutated, Some(_)) => (text, Expect::Refuse),
            (CertIs::Mutated, None) | (CertIs::Unfixed, _) => (text, Expect::Unknown),
            (CertIs::Fixture(which), None) => (text, Expect::Accept(which)),
            (CertIs::Fixture(which), Some(Some(h))) if h == which => (text, Expect::Accept(which)),
            (CertIs::Fixture(_), Some(_)) => (text, Expect::Refuse),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{api, fixtures};

    fn element(pairs: Vec<(KeyText, Value)>) -> Xfcc {
        Xfcc {
            elements: vec![pairs],
        }
    }

    fn cert(which: Which) -> (KeyText, Value) {
        (
            KeyText::Canonical(Key::Cert),
            Value::Cert {
                which,
                quoted: true,
            },
        )
    }

    fn hash(which: Which) -> (KeyText, Value) {
        (KeyText::Canonical(Key::Hash), Value::HashOf(which))
    }

    /// The model's expectation, and the filter agrees with it.
    fn expect(spec: &Xfcc) -> Expect {
        let fx = fixtures();
        let (text, expect) = spec.render(fx);
        let result = api::xfcc_identity(&[text.as_bytes()]).expect("rendered text is UTF-8");
        match expect {
            Expect::Accept(which) => assert_eq!(
                result.expect("accepted").fingerprint,
                fx.cert(which).identity.fingerprint
            ),
            Expect::Refuse => assert!(result.is_err(), "{text}"),
            Expect::Unknown => {}
        }
        expect
    }

    #[test]
    fn serve_and_envoy_formats_are_accepted() {
        assert_eq!(
            expect(&element(vec![hash(Which::P256), cert(Which::P256)])),
            Expect::Accept(Which::P256)
        );
        let envoy = element(vec![
            (
                KeyText::Canonical(Key::By),
                Value::Raw("spiffe://gw".into()),
            ),
            hash(Which::Rsa),
            cert(Which::Rsa),
            (
                KeyText::Canonical(Key::Subject),
                Value::Quoted("CN=alice,O=azure-reader".into()),
            ),
            (KeyText::Canonical(Key::Uri), Value::Raw(String::new())),
            (
                KeyText::Canonical(Key::Dns),
                Value::Raw("alice.test".into()),
            ),
        ]);
        assert_eq!(expect(&envoy), Expect::Accept(Which::Rsa));
    }

    #[test]
    fn a_second_cert_injected_through_a_san_is_refused() {
        let spec = element(vec![
            hash(Which::P256),
            cert(Which::P256),
            (
                KeyText::Canonical(Key::Uri),
                Value::Injected {
                    which: Which::Rsa,
                    prefix: "x".into(),
                },
            ),
        ]);
        assert_eq!(expect(&spec), Expect::Refuse);
    }

    #[test]
    fn a_wrong_hash_two_elements_and_unknown_keys_are_refused() {
        assert_eq!(
            expect(&element(vec![hash(Which::Rsa), cert(Which::P256)])),
            Expect::Refuse
        );
        let two = Xfcc {
            elements: vec![vec![cert(Which::P256)], vec![cert(Which::P256)]],
        };
        assert_eq!(expect(&two), Expect::Refuse);
        let unknown = element(vec![
            cert(Which::P256),
            (KeyText::Other("Foo".into()), Value::Raw("1".into())),
        ]);
        assert_eq!(expect(&unknown), Expect::Refuse);
        assert_eq!(
            expect(&element(vec![(KeyText::Canonical(Key::Cert), Value::Ca)])),
            Expect::Refuse
        );
    }
}
