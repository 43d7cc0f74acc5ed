//! Teleport role templates in `azure_identities`, evaluated as Teleport evaluates them.
//!
//! A value is a literal (`/subscriptions/…`) or at most one `{{expression}}` with literal text
//! around it (`prefix{{…}}suffix`, neither containing a brace). Expressions:
//!
//! - `internal.NAME` / `internal["NAME"]`: every value of the user's trait NAME, which must be
//!   one of Teleport's internal traits ([`INTERNAL_TRAITS`]);
//! - `external.NAME` / `external["NAME"]`: every value of any trait (SSO claims);
//! - `email.local(EXPR)`: the local part of each value that is an e-mail address;
//! - `regexp.replace(EXPR, "PATTERN", "REPLACEMENT")`: each value that matches PATTERN, with
//!   every match replaced (`$1` refers to a group); values that do not match are dropped.
//!
//! A missing trait expands to nothing; empty values are dropped; the prefix and suffix are added
//! to each value that is left. Anything else is a configuration error, so a role that would
//! silently grant nothing is refused when the configuration is loaded. Traits come from the
//! caller's certificate (Teleport writes them as JSON in the Subject's PostalCode).

use std::collections::BTreeMap;
use std::fmt;

use regex_lite::Regex;

/// A user's traits, by name: what Teleport writes in the certificate's PostalCode attribute.
pub type Traits = BTreeMap<String, Vec<String>>;

/// The trait names Teleport accepts after `internal.` (`api/constants`: the `Trait*` names).
pub const INTERNAL_TRAITS: &[&str] = &[
    "logins",
    "windows_logins",
    "kubernetes_groups",
    "kubernetes_users",
    "db_names",
    "db_users",
    "db_roles",
    "aws_role_arns",
    "azure_identities",
    "gcp_service_accounts",
    "host_user_uid",
    "host_user_gid",
    "jwt",
];

/// Expressions nest at most this deep (`email.local(regexp.replace(…))` is 2).
const MAX_DEPTH: usize = 4;

/// One `azure_identities` value from a role.
#[derive(Clone, Debug)]
pub enum Template {
    /// No braces: the value itself.
    Literal(String),
    /// `prefix{{expression}}suffix`.
    Expansion {
        /// Text before `{{`.
        prefix: String,
        /// What the braces hold.
        expression: Expression,
        /// Text after `}}`.
        suffix: String,
    },
}

/// The part between the braces.
#[derive(Clone, Debug)]
pub enum Expression {
    /// `internal.NAME` or `external.NAME`: the trait's values.
    Trait {
        /// `internal` or `external`.
        namespace: Namespace,
        /// The trait's name.
        name: String,
    },
    /// `email.local(EXPR)`.
    EmailLocal(Box<Expression>),
    /// `regexp.replace(EXPR, "PATTERN", "REPLACEMENT")`.
    RegexpReplace {
        /// The expression whose values are rewritten.
        input: Box<Expression>,
        /// The regular expression, as `regexp.replace` takes it in Teleport.
        pattern: Regex,
        /// The replacement, with `$1`-style groups.
        replacement: String,
    },
}

/// Where a trait name is looked up (both read the certificate's one trait map, as in Teleport).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Namespace {
    /// `internal.*`: traits Teleport sets.
    Internal,
    /// `external.*`: traits from the identity provider.
    External,
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Internal => "internal",
            Self::External => "external",
        })
    }
}

impl Template {
    /// Parses one value; the error says what is wrong, for a configuration error.
    pub fn parse(value: &str) -> Result<Self, String> {
        let Some(open) = value.find("{{") else {
            if value.contains("}}") {
                return Err(unparsable(value));
            }
            return Ok(Self::Literal(value.to_string()));
        };
        let close = value[open..]
            .find("}}")
            .map(|i| open + i)
            .ok_or_else(|| unparsable(value))?;
        let (prefix, inner, suffix) =
            (&value[..open], &value[open + 2..close], &value[close + 2..]);
        if [prefix, inner, suffix]
            .iter()
            .any(|part| part.contains(['{', '}']))
        {
            return Err(unparsable(value));
        }
        let mut parser = Parser {
            text: inner,
            at: 0,
            depth: 0,
        };
        let expression = parser.expression()?;
        parser.skip_space();
        if parser.at != inner.len() {
            return Err(format!(
                "unexpected {:?} in template {value:?}",
                &inner[parser.at..]
            ));
        }
        Ok(Self::Expansion {
            prefix: prefix.to_string(),
            expression,
            suffix: suffix.to_string(),
        })
    }

    /// Whether the value has no expression.
    pub fn is_literal(&self) -> bool {
        matches!(self, Self::Literal(_))
    }

    /// The values for a user with `traits`: the literal, or the expansion (possibly none).
    pub fn expand(&self, traits: &Traits) -> Vec<String> {
        match self {
            Self::Literal(value) => vec![value.clone()],
            Self::Expansion {
                prefix,
                expression,
                suffix,
            } => expression
                .evaluate(traits)
                .into_iter()
                .filter(|value| !value.is_empty())
                .map(|value| format!("{prefix}{value}{suffix}"))
                .collect(),
        }
    }
}

impl Expression {
    fn evaluate(&self, traits: &Traits) -> Vec<String> {
        match self {
            Self::Trait { name, .. } => traits.get(name).cloned().unwrap_or_default(),
            Self::EmailLocal(input) => input
                .evaluate(traits)
                .iter()
                .filter_map(|value| email_local(value))
                .collect(),
            Self::RegexpReplace {
                input,
                pattern,
                replacement,
            } => input
                .evaluate(traits)
                .iter()
                .filter(|value| pattern.is_match(value))
                .map(|value| {
                    pattern
                        .replace_all(value, replacement.as_str())
                        .into_owned()
                })
                .collect(),
        }
    }
}

fn unparsable(value: &str) -> String {
    format!("{value:?} uses template braces but is not of the form prefix{{{{expression}}}}suffix")
}

/// The local part of an address (`alice@example.com`, `Alice <alice@example.com>`), or `None`
/// when the value is not one address.
fn email_local(value: &str) -> Option<String> {
    let value = value.trim();
    let address = match (value.rfind('<'), value.strip_suffix('>')) {
        (Some(open), Some(rest)) => &rest[open + 1..],
        (None, None) => value,
        _ => return None,
    };
    let (local, domain) = address.split_once('@')?;
    let valid = |part: &str| {
        !part.is_empty()
            && !part
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "<>@,;:\"()[]\\".contains(c))
    };
    (valid(local) && valid(domain)).then(|| local.to_string())
}

/// A small recursive-descent parser for the expression between the braces.
struct Parser<'a> {
    text: &'a str,
    at: usize,
    depth: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.text[self.at..]
    }

    fn skip_space(&mut self) {
        let rest = self.rest();
        self.at += rest.len() - rest.trim_start().len();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        if self.rest().starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str) -> Result<(), String> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(format!(
                "expected {token:?} at {:?} in template expression {:?}",
                self.rest(),
                self.text
            ))
        }
    }

    /// `[A-Za-z_][A-Za-z0-9_]*`.
    fn identifier(&mut self) -> Result<&str, String> {
        self.skip_space();
        let rest = self.rest();
        let len = rest
            .char_indices()
            .find(|&(i, c)| !(c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())))
            .map_or(rest.len(), |(i, _)| i);
        if len == 0 {
            return Err(format!(
                "expected a name at {rest:?} in template expression {:?}",
                self.text
            ));
        }
        let start = self.at;
        self.at += len;
        Ok(&self.text[start..self.at])
    }

    /// A Go-style double-quoted string: `\\` and `\"` escapes only.
    fn string(&mut self) -> Result<String, String> {
        self.expect("\"")?;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.at += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, escaped @ ('\\' | '"'))) => out.push(escaped),
                    _ => {
                        return Err(format!(
                            "only \\\\ and \\\" escapes are supported in template strings: {:?}",
                            self.text
                        ));
                    }
                },
                c => out.push(c),
            }
        }
        Err(format!(
            "unterminated string in template expression {:?}",
            self.text
        ))
    }

    fn expression(&mut self) -> Result<Expression, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!(
                "template expression {:?} nests deeper than {MAX_DEPTH}",
                self.text
            ));
        }
        let head = self.identifier()?.to_string();
        let expression = if self.eat("[") {
            let name = self.string()?;
            self.expect("]")?;
            trait_reference(&head, name, self.text)?
        } else {
            self.expect(".")?;
            let member = self.identifier()?.to_string();
            if self.eat("(") {
                let function = format!("{head}.{member}");
                let input = Box::new(self.expression()?);
                let call = match function.as_str() {
                    "email.local" => Expression::EmailLocal(input),
                    "regexp.replace" => {
                        self.expect(",")?;
                        let pattern = self.string()?;
                        self.expect(",")?;
                        let replacement = self.string()?;
                        let pattern = Regex::new(&pattern).map_err(|e| {
                            format!("regexp.replace pattern {pattern:?} does not compile: {e}")
                        })?;
                        Expression::RegexpReplace {
                            input,
                            pattern,
                            replacement,
                        }
                    }
                    _ => {
                        return Err(format!(
                            "unsupported function {function}() in template expression {:?} \
                             (supported: email.local, regexp.replace)",
                            self.text
                        ));
                    }
                };
                self.expect(")")?;
                call
            } else {
                trait_reference(&head, member, self.text)?
            }
        };
        self.depth -= 1;
        Ok(expression)
    }
}

fn trait_reference(namespace: &str, name: String, text: &str) -> Result<Expression, String> {
    let namespace = match namespace {
        "internal" => Namespace::Internal,
        "external" => Namespace::External,
        other => {
            return Err(format!(
                "unknown namespace {other:?} in template expression {text:?} \
                 (use internal or external)"
            ));
        }
    };
    if name.is_empty() {
        return Err(format!("empty trait name in template expression {text:?}"));
    }
    if namespace == Namespace::Internal && !INTERNAL_TRAITS.contains(&name.as_str()) {
        return Err(format!(
            "internal.{name} is not a Teleport internal trait (use external.{name} for other traits)"
        ));
    }
    Ok(Expression::Trait { namespace, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traits(pairs: &[(&str, &[&str])]) -> Traits {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    fn expand(template: &str, traits: &Traits) -> Vec<String> {
        Template::parse(template).unwrap().expand(traits)
    }

    #[test]
    fn literals_are_themselves() {
        let t = Template::parse("/subscriptions/1/x").unwrap();
        assert!(t.is_literal());
        assert_eq!(t.expand(&Traits::new()), ["/subscriptions/1/x"]);
    }

    #[test]
    fn internal_and_external_traits_expand_to_every_value() {
        let user = traits(&[("azure_identities", &["/a", "/b"]), ("groups", &["x"])]);
        assert_eq!(expand("{{internal.azure_identities}}", &user), ["/a", "/b"]);
        assert_eq!(
            expand("{{ internal.azure_identities }}", &user),
            ["/a", "/b"]
        );
        assert_eq!(expand("{{external.groups}}", &user), ["x"]);
        assert_eq!(expand("{{external[\"groups\"]}}", &user), ["x"]);
        assert_eq!(
            expand("{{internal[\"azure_identities\"]}}", &user),
            ["/a", "/b"]
        );
    }

    #[test]
    fn a_missing_trait_and_empty_values_expand_to_nothing() {
        let user = traits(&[("azure_identities", &["", "/a"])]);
        assert!(expand("{{external.missing}}", &user).is_empty());
        assert_eq!(expand("{{internal.azure_identities}}", &user), ["/a"]);
        assert!(expand("{{internal.azure_identities}}", &Traits::new()).is_empty());
    }

    #[test]
    fn prefix_and_suffix_are_added_to_each_value() {
        let user = traits(&[("team", &["red", "blue"])]);
        assert_eq!(
            expand(
                "/subscriptions/1/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{{external.team}}-reader",
                &user
            ),
            [
                "/subscriptions/1/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/red-reader",
                "/subscriptions/1/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/blue-reader",
            ]
        );
    }

    #[test]
    fn email_local_keeps_the_local_part_of_addresses_only() {
        let user = traits(&[(
            "email",
            &[
                "alice@example.com",
                "Bob <bob@example.com>",
                "not an address",
                "@x",
                "a@b@c",
            ],
        )]);
        assert_eq!(
            expand("id-{{email.local(external.email)}}", &user),
            ["id-alice", "id-bob"]
        );
    }

    #[test]
    fn regexp_replace_drops_values_that_do_not_match() {
        let user = traits(&[("groups", &["team-red", "admins", "team-blue"])]);
        assert_eq!(
            expand(
                "{{regexp.replace(external.groups, \"^team-(.*)$\", \"$1\")}}",
                &user
            ),
            ["red", "blue"]
        );
        // Functions nest.
        let user = traits(&[("email", &["team-red@example.com"])]);
        assert_eq!(
            expand(
                "{{regexp.replace(email.local(external.email), \"^team-(.*)$\", \"$1-id\")}}",
                &user
            ),
            ["red-id"]
        );
    }

    #[test]
    fn anything_else_is_a_configuration_error() {
        for bad in [
            "{{internal.unknown_trait}}",
            "{{secret.azure_identities}}",
            "{{internal}}",
            "{{internal.}}",
            "{{internal.azure_identities",
            "internal.azure_identities}}",
            "{{a.b}}{{c.d}}",
            "{{{internal.logins}}}",
            "{{strings.upper(external.x)}}",
            "{{email.local(external.x, \"y\")}}",
            "{{regexp.replace(external.x, \"(\", \"y\")}}",
            "{{regexp.replace(external.x, \"a\")}}",
            "{{regexp.replace(external.x, \"a\\n\", \"b\")}}",
            "{{external.x extra}}",
            "{{external[\"x]}}",
            "{{email.local(email.local(email.local(email.local(external.x))))}}",
            "{{}}",
            "{{ }}",
            // No braces between the braces, as in Teleport, so `${name}` cannot be written.
            "{{regexp.replace(external.x, \"(?P<t>a)\", \"${t}\")}}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostile_trait_values_are_only_text() {
        // Values are never parsed as templates themselves.
        let user = traits(&[("x", &["{{internal.logins}}", "a\u{0}b", "é"])]);
        assert_eq!(
            expand("{{external.x}}", &user),
            ["{{internal.logins}}", "a\u{0}b", "é"]
        );
    }
}
