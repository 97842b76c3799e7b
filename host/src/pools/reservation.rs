//! Signed reservations: how a pool is filled.
//!
//! A reservation travels as an envelope, a JSON object:
//!
//! ```text
//! {"payload": BASE64, "customer_signature": BASE64, "sponsor_signature": BASE64 | null}
//! ```
//!
//! Every BASE64 is standard base64 with padding (RFC 4648 section 4,
//! canonical: no missing padding, no stray bits). `sponsor_signature` may
//! be absent or `null`. The envelope is at most [`MAX_ENVELOPE`] bytes and
//! holds no other fields.
//!
//! The payload is the reservation itself, as the exact JSON bytes that
//! were signed:
//!
//! ```text
//! {"id": "...", "pool": "NAME", "customer": "USER", "cu": N, "su": N, "ipv4u": N}
//! ```
//!
//! `cu`, `su` and `ipv4u` are whole unit-seconds: JSON integers from 0 to
//! 2^64 - 1, written without fraction or exponent. `id` is unique for
//! ever: an id once accepted is refused as replayed. Every field is
//! required, none may appear twice, and no other field is allowed.
//!
//! Both signatures are ed25519 (RFC 8032) over exactly the payload bytes,
//! checked with the strict rules (`verify_strict`: no small-order keys,
//! no non-canonical encodings). The customer must be the pool's owner and
//! sign with one of their registered keys; a pool created with a sponsor
//! also needs the sponsor's signature by one of the sponsor's keys, and a
//! pool without one refuses a sponsor signature rather than carry an
//! unchecked one into the audit log.

use super::keys::KeyRing;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::fmt;

/// The largest envelope accepted, in bytes.
pub const MAX_ENVELOPE: usize = 64 * 1024;
/// The longest reservation id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// The longest pool or customer name in a payload, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// A reservation, as its payload says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reservation {
    pub id: String,
    pub pool: String,
    pub customer: String,
    /// CU-seconds.
    pub cu: u64,
    /// SU-seconds.
    pub su: u64,
    /// IPv4U-seconds.
    pub ipv4u: u64,
}

/// What [`verify`] needs to know about a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    pub owner: String,
    pub sponsor: Option<String>,
}

/// Why a reservation was refused: one line, naming the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReservationError {
    #[error("oversized envelope: {len} bytes, at most {MAX_ENVELOPE} are accepted")]
    Oversized { len: usize },
    #[error(
        "malformed envelope: {0}; expected {{\"payload\": BASE64, \
         \"customer_signature\": BASE64, \"sponsor_signature\": BASE64 or null}}"
    )]
    Envelope(String),
    #[error("bad base64 in {field}: {what} (standard base64 with padding is expected)")]
    Base64 { field: &'static str, what: String },
    #[error("{field} is {len} bytes; an ed25519 signature is 64")]
    SignatureLength { field: &'static str, len: usize },
    #[error("malformed payload: {field}: {what}")]
    Payload { field: String, what: String },
    #[error("unknown pool '{0}'")]
    UnknownPool(String),
    #[error("customer '{customer}' is not the owner of pool '{pool}' (its owner is '{owner}')")]
    NotOwner {
        customer: String,
        pool: String,
        owner: String,
    },
    #[error("no key registered for {0} (register one with `tt-host key add {0} PUBKEY`)")]
    NoKey(String),
    #[error("customer signature does not verify with any key registered for {0}")]
    CustomerSignature(String),
    #[error("sponsor signature missing (pool {pool} requires sponsor {sponsor})")]
    SponsorMissing { pool: String, sponsor: String },
    #[error("sponsor signature does not verify with any key registered for {0}")]
    SponsorSignature(String),
    #[error("sponsor signature given but pool {0} has no sponsor; leave it out")]
    UnexpectedSponsor(String),
    #[error("replayed id '{0}': a reservation with this id was already accepted")]
    Replayed(String),
}

/// A decoded envelope: the payload's bytes and the signatures over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireEnvelope", into = "WireEnvelope")]
pub struct Envelope {
    pub payload: Vec<u8>,
    pub customer_signature: Signature,
    pub sponsor_signature: Option<Signature>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEnvelope {
    payload: String,
    customer_signature: String,
    #[serde(default)]
    sponsor_signature: Option<String>,
}

fn decode(field: &'static str, text: &str) -> Result<Vec<u8>, ReservationError> {
    STANDARD.decode(text).map_err(|e| ReservationError::Base64 {
        field,
        what: e.to_string(),
    })
}

fn signature(field: &'static str, text: &str) -> Result<Signature, ReservationError> {
    let bytes = decode(field, text)?;
    Signature::from_slice(&bytes).map_err(|_| ReservationError::SignatureLength {
        field,
        len: bytes.len(),
    })
}

impl TryFrom<WireEnvelope> for Envelope {
    type Error = ReservationError;

    fn try_from(w: WireEnvelope) -> Result<Envelope, ReservationError> {
        Ok(Envelope {
            payload: decode("payload", &w.payload)?,
            customer_signature: signature("customer_signature", &w.customer_signature)?,
            sponsor_signature: w
                .sponsor_signature
                .as_deref()
                .map(|s| signature("sponsor_signature", s))
                .transpose()?,
        })
    }
}

impl From<Envelope> for WireEnvelope {
    fn from(e: Envelope) -> WireEnvelope {
        WireEnvelope {
            payload: STANDARD.encode(&e.payload),
            customer_signature: STANDARD.encode(e.customer_signature.to_bytes()),
            sponsor_signature: e.sponsor_signature.map(|s| STANDARD.encode(s.to_bytes())),
        }
    }
}

impl Envelope {
    /// Decode an envelope's bytes (no signature is checked here).
    pub fn parse(bytes: &[u8]) -> Result<Envelope, ReservationError> {
        if bytes.len() > MAX_ENVELOPE {
            return Err(ReservationError::Oversized { len: bytes.len() });
        }
        let bad = |e: serde_json::Error| ReservationError::Envelope(e.to_string());
        // An object only: serde would take a struct as an array too.
        let value: Value = serde_json::from_slice(bytes).map_err(bad)?;
        if !value.is_object() {
            return Err(ReservationError::Envelope(format!(
                "not a JSON object but {}",
                kind(&value)
            )));
        }
        let wire: WireEnvelope = serde_json::from_value(value).map_err(bad)?;
        Envelope::try_from(wire)
    }

    /// The envelope as JSON bytes, in the form [`Envelope::parse`] reads.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&WireEnvelope::from(self.clone())).expect("strings always encode")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON object's entries in order, duplicates kept (a signed document
/// must not mean one thing to us and another to a different parser).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entries, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(V)
    }
}

fn malformed(field: &str, what: impl Into<String>) -> ReservationError {
    ReservationError::Payload {
        field: field.to_string(),
        what: what.into(),
    }
}

fn text_field(field: &str, value: &Value, max: usize) -> Result<String, ReservationError> {
    let Value::String(s) = value else {
        return Err(malformed(field, format!("expected a string, got {value}")));
    };
    if s.is_empty() || s.len() > max {
        return Err(malformed(
            field,
            format!("must be 1 to {max} bytes, is {}", s.len()),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(malformed(field, "must not hold control characters"));
    }
    Ok(s.clone())
}

fn amount_field(field: &str, value: &Value) -> Result<u64, ReservationError> {
    let whole = "a whole number of unit-seconds from 0 to 18446744073709551615 \
                 (no fraction, exponent or quotes)";
    match value {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| malformed(field, format!("{n} is not {whole}"))),
        other => Err(malformed(field, format!("{other} is not {whole}"))),
    }
}

impl Reservation {
    /// Parse a payload strictly (see the module doc).
    pub fn parse(payload: &[u8]) -> Result<Reservation, ReservationError> {
        let Entries(entries) = serde_json::from_slice(payload)
            .map_err(|e| malformed("(payload)", format!("not a JSON object: {e}")))?;
        const FIELDS: [&str; 6] = ["id", "pool", "customer", "cu", "su", "ipv4u"];
        let mut found: [Option<&Value>; 6] = [None; 6];
        for (name, value) in &entries {
            let Some(i) = FIELDS.iter().position(|f| f == name) else {
                let shown: String = name.chars().take(64).collect();
                return Err(malformed(
                    &shown.escape_debug().to_string(),
                    "unknown field (the fields are id, pool, customer, cu, su, ipv4u)",
                ));
            };
            if found[i].replace(value).is_some() {
                return Err(malformed(name, "appears twice"));
            }
        }
        let get = |i: usize| found[i].ok_or_else(|| malformed(FIELDS[i], "missing"));
        Ok(Reservation {
            id: text_field("id", get(0)?, MAX_ID_LEN)?,
            pool: text_field("pool", get(1)?, MAX_NAME_LEN)?,
            customer: text_field("customer", get(2)?, MAX_NAME_LEN)?,
            cu: amount_field("cu", get(3)?)?,
            su: amount_field("su", get(4)?)?,
            ipv4u: amount_field("ipv4u", get(5)?)?,
        })
    }

    /// The payload bytes for this reservation, in the documented field
    /// order (what the signing helper signs).
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("strings and integers always encode")
    }
}

/// A reservation whose envelope passed every check of [`verify`]. Only
/// [`verify`] makes one, so holding one means it was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    reservation: Reservation,
    envelope: Envelope,
}

impl Accepted {
    pub fn reservation(&self) -> &Reservation {
        &self.reservation
    }

    /// The envelope as received (decoded); [`Envelope::to_json`] gives
    /// bytes that verify again.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }
}

fn verifies(keys: &[VerifyingKey], payload: &[u8], sig: &Signature) -> bool {
    keys.iter().any(|k| k.verify_strict(payload, sig).is_ok())
}

/// Check an envelope: its form, its payload, the pool (`lookup_pool`
/// gives a pool's owner and sponsor, `None` if there is no such pool),
/// the signatures against `keys`, and that its id is new (`seen` says
/// whether an id was already accepted). Checks run in that order, and
/// the first that fails is the error.
///
/// Nothing is recorded: the caller appends the [`Accepted`] to the audit
/// log (which refuses an id twice) before it reports the acceptance.
pub fn verify(
    envelope: &[u8],
    lookup_pool: impl Fn(&str) -> Option<PoolInfo>,
    keys: &KeyRing,
    seen: impl Fn(&str) -> bool,
) -> Result<Accepted, ReservationError> {
    let envelope = Envelope::parse(envelope)?;
    let reservation = Reservation::parse(&envelope.payload)?;
    let r = &reservation;
    let pool = lookup_pool(&r.pool).ok_or_else(|| ReservationError::UnknownPool(r.pool.clone()))?;
    if r.customer != pool.owner {
        return Err(ReservationError::NotOwner {
            customer: r.customer.clone(),
            pool: r.pool.clone(),
            owner: pool.owner,
        });
    }
    let customer_keys = keys.keys(&r.customer);
    if customer_keys.is_empty() {
        return Err(ReservationError::NoKey(r.customer.clone()));
    }
    if !verifies(
        customer_keys,
        &envelope.payload,
        &envelope.customer_signature,
    ) {
        return Err(ReservationError::CustomerSignature(r.customer.clone()));
    }
    match (&pool.sponsor, &envelope.sponsor_signature) {
        (None, None) => {}
        (None, Some(_)) => return Err(ReservationError::UnexpectedSponsor(r.pool.clone())),
        (Some(sponsor), None) => {
            return Err(ReservationError::SponsorMissing {
                pool: r.pool.clone(),
                sponsor: sponsor.clone(),
            })
        }
        (Some(sponsor), Some(sig)) => {
            let sponsor_keys = keys.keys(sponsor);
            if sponsor_keys.is_empty() {
                return Err(ReservationError::NoKey(sponsor.clone()));
            }
            if !verifies(sponsor_keys, &envelope.payload, sig) {
                return Err(ReservationError::SponsorSignature(sponsor.clone()));
            }
        }
    }
    if seen(&r.id) {
        return Err(ReservationError::Replayed(r.id.clone()));
    }
    Ok(Accepted {
        reservation,
        envelope,
    })
}

/// Sign `payload` (the customer, and the sponsor if given) and return
/// the envelope's JSON bytes. The payload is not checked here; [`verify`]
/// does that.
pub fn sign(payload: &[u8], customer: &SigningKey, sponsor: Option<&SigningKey>) -> Vec<u8> {
    Envelope {
        payload: payload.to_vec(),
        customer_signature: customer.sign(payload),
        sponsor_signature: sponsor.map(|s| s.sign(payload)),
    }
    .to_json()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }
    pub(crate) const ALICE: u8 = 1;
    pub(crate) const BOB: u8 = 2;
    pub(crate) const SPONSOR: u8 = 3;
    pub(crate) const MALLORY: u8 = 4;

    pub(crate) fn ring() -> KeyRing {
        let mut ring = KeyRing::new();
        ring.add("alice", key(ALICE).verifying_key()).unwrap();
        ring.add("bob", key(BOB).verifying_key()).unwrap();
        ring.add("carol", key(SPONSOR).verifying_key()).unwrap();
        ring
    }

    /// Pools: "web" (alice's), "shared" (bob's, sponsored by carol).
    pub(crate) fn pools(name: &str) -> Option<PoolInfo> {
        match name {
            "web" => Some(PoolInfo {
                owner: "alice".into(),
                sponsor: None,
            }),
            "shared" => Some(PoolInfo {
                owner: "bob".into(),
                sponsor: Some("carol".into()),
            }),
            _ => None,
        }
    }

    pub(crate) fn payload(id: &str, pool: &str, customer: &str) -> Vec<u8> {
        Reservation {
            id: id.into(),
            pool: pool.into(),
            customer: customer.into(),
            cu: 3600,
            su: 7200,
            ipv4u: 0,
        }
        .to_payload()
    }

    fn check(envelope: &[u8]) -> Result<Accepted, ReservationError> {
        verify(envelope, pools, &ring(), |_| false)
    }

    fn err(envelope: &[u8]) -> String {
        check(envelope).unwrap_err().to_string()
    }

    #[test]
    fn a_customer_signed_reservation_is_accepted() {
        let p = payload("r1", "web", "alice");
        assert_eq!(
            p,
            br#"{"id":"r1","pool":"web","customer":"alice","cu":3600,"su":7200,"ipv4u":0}"#
        );
        let a = check(&sign(&p, &key(ALICE), None)).unwrap();
        assert_eq!(a.reservation().id, "r1");
        assert_eq!(a.reservation().cu, 3600);
        assert_eq!(a.reservation().su, 7200);
        assert_eq!(a.envelope().payload, p);
        // Its envelope, written again, verifies again.
        assert_eq!(check(&a.envelope().to_json()).unwrap(), a);
    }

    #[test]
    fn a_sponsored_pool_takes_both_signatures() {
        let p = payload("r2", "shared", "bob");
        let a = check(&sign(&p, &key(BOB), Some(&key(SPONSOR)))).unwrap();
        assert_eq!(a.reservation().pool, "shared");
    }

    #[test]
    fn a_second_key_of_the_customer_is_accepted_too() {
        let mut ring = ring();
        ring.add("alice", key(9).verifying_key()).unwrap();
        let env = sign(&payload("r", "web", "alice"), &key(9), None);
        assert!(verify(&env, pools, &ring, |_| false).is_ok());
    }

    #[test]
    fn one_changed_byte_of_the_payload_is_refused() {
        let p = payload("r1", "web", "alice");
        let env = sign(&p, &key(ALICE), None);
        let mut e = Envelope::parse(&env).unwrap();
        // "cu":3600 -> "cu":9600: still a valid reservation, not signed.
        let at = e.payload.windows(4).position(|w| w == b"3600").unwrap();
        e.payload[at] = b'9';
        assert_eq!(
            err(&e.to_json()),
            "customer signature does not verify with any key registered for alice"
        );
        // Same with a sponsored pool: the customer check fails first.
        let mut e = Envelope::parse(&sign(
            &payload("r", "shared", "bob"),
            &key(BOB),
            Some(&key(SPONSOR)),
        ))
        .unwrap();
        let n = e.payload.len();
        e.payload[n - 2] = b'1'; // "ipv4u":0 -> 1
        assert!(err(&e.to_json()).starts_with("customer signature does not verify"));
    }

    #[test]
    fn a_signature_by_another_key_is_refused() {
        let env = sign(&payload("r", "web", "alice"), &key(MALLORY), None);
        assert_eq!(
            err(&env),
            "customer signature does not verify with any key registered for alice"
        );
        // bob's key is registered, but for bob.
        let env = sign(&payload("r", "web", "alice"), &key(BOB), None);
        assert!(err(&env).starts_with("customer signature does not verify"));
    }

    #[test]
    fn a_replayed_id_is_refused() {
        let env = sign(&payload("r1", "web", "alice"), &key(ALICE), None);
        let e = verify(&env, pools, &ring(), |id| id == "r1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "replayed id 'r1': a reservation with this id was already accepted"
        );
    }

    #[test]
    fn a_sponsored_pool_refuses_a_missing_or_wrong_sponsor_signature() {
        let p = payload("r", "shared", "bob");
        assert_eq!(
            err(&sign(&p, &key(BOB), None)),
            "sponsor signature missing (pool shared requires sponsor carol)"
        );
        assert_eq!(
            err(&sign(&p, &key(BOB), Some(&key(MALLORY)))),
            "sponsor signature does not verify with any key registered for carol"
        );
        // The customer signing twice is no sponsor signature.
        assert!(
            err(&sign(&p, &key(BOB), Some(&key(BOB)))).starts_with("sponsor signature does not")
        );
        // A sponsor with no key at all.
        let lookup = |_: &str| {
            Some(PoolInfo {
                owner: "bob".into(),
                sponsor: Some("dave".into()),
            })
        };
        let e = verify(
            &sign(&p, &key(BOB), Some(&key(SPONSOR))),
            lookup,
            &ring(),
            |_| false,
        );
        assert_eq!(
            e.unwrap_err().to_string(),
            "no key registered for dave (register one with `tt-host key add dave PUBKEY`)"
        );
        // A pool without a sponsor refuses an unchecked sponsor signature.
        let p = payload("r", "web", "alice");
        assert!(err(&sign(&p, &key(ALICE), Some(&key(SPONSOR))))
            .starts_with("sponsor signature given but pool web has no sponsor"));
    }

    #[test]
    fn an_unknown_pool_a_foreign_customer_and_a_keyless_one_are_refused() {
        assert_eq!(
            err(&sign(&payload("r", "nope", "alice"), &key(ALICE), None)),
            "unknown pool 'nope'"
        );
        assert_eq!(
            err(&sign(&payload("r", "shared", "alice"), &key(ALICE), None)),
            "customer 'alice' is not the owner of pool 'shared' (its owner is 'bob')"
        );
        let lookup = |_: &str| {
            Some(PoolInfo {
                owner: "erin".into(),
                sponsor: None,
            })
        };
        let env = sign(&payload("r", "x", "erin"), &key(ALICE), None);
        let e = verify(&env, lookup, &ring(), |_| false).unwrap_err();
        assert!(
            e.to_string().starts_with("no key registered for erin"),
            "{e}"
        );
    }

    fn with_amount(cu: &str) -> Vec<u8> {
        format!(r#"{{"id":"r","pool":"web","customer":"alice","cu":{cu},"su":0,"ipv4u":0}}"#)
            .into_bytes()
    }

    #[test]
    fn amounts_must_be_whole_non_negative_u64_integers() {
        for bad in [
            "1.5",
            "1e3",
            "1E3",
            "\"3\"",
            "-1",
            "18446744073709551616",
            "3.0",
            "null",
            "true",
            "[1]",
        ] {
            let env = sign(&with_amount(bad), &key(ALICE), None);
            let e = err(&env);
            assert!(e.starts_with("malformed payload: cu: "), "{bad}: {e}");
            assert!(e.contains("whole number"), "{bad}: {e}");
        }
        let env = sign(&with_amount("18446744073709551615"), &key(ALICE), None);
        assert_eq!(check(&env).unwrap().reservation().cu, u64::MAX);
        let env = sign(&with_amount("0"), &key(ALICE), None);
        assert_eq!(check(&env).unwrap().reservation().cu, 0);
    }

    #[test]
    fn payload_fields_are_checked_by_name() {
        let cases: [(&str, &str); 10] = [
            (
                r#"{"id":"r","pool":"web","customer":"alice","cu":1,"su":1}"#,
                "malformed payload: ipv4u: missing",
            ),
            (
                r#"{"id":"r","pool":"web","customer":"alice","cu":1,"su":1,"ipv4u":1,"extra":1}"#,
                "malformed payload: extra: unknown field",
            ),
            (
                r#"{"id":"r","pool":"web","customer":"alice","cu":1,"cu":2,"su":1,"ipv4u":1}"#,
                "malformed payload: cu: appears twice",
            ),
            (
                r#"{"id":"","pool":"web","customer":"alice","cu":1,"su":1,"ipv4u":1}"#,
                "malformed payload: id: must be 1 to 128 bytes",
            ),
            (
                r#"{"id":5,"pool":"web","customer":"alice","cu":1,"su":1,"ipv4u":1}"#,
                "malformed payload: id: expected a string",
            ),
            (
                r#"{"id":"a\nb","pool":"web","customer":"alice","cu":1,"su":1,"ipv4u":1}"#,
                "malformed payload: id: must not hold control",
            ),
            (
                r#"{"id":"r","pool":null,"customer":"alice","cu":1,"su":1,"ipv4u":1}"#,
                "malformed payload: pool: expected a string",
            ),
            (
                r#"[1,2]"#,
                "malformed payload: (payload): not a JSON object",
            ),
            (
                r#"{"id":"r","pool":"web","customer":"alice","cu":1,"su":1,"ipv4u":1} x"#,
                "malformed payload: (payload): not a JSON object",
            ),
            ("", "malformed payload: (payload): not a JSON object"),
        ];
        for (p, want) in cases {
            let e = err(&sign(p.as_bytes(), &key(ALICE), None));
            assert!(e.starts_with(want), "{p}: {e}");
        }
        let long = format!(
            r#"{{"id":"{}","pool":"web","customer":"alice","cu":1,"su":1,"ipv4u":1}}"#,
            "x".repeat(MAX_ID_LEN + 1)
        );
        assert!(
            err(&sign(long.as_bytes(), &key(ALICE), None)).starts_with("malformed payload: id:")
        );
    }

    #[test]
    fn garbage_envelopes_are_refused_with_the_reason() {
        let good = sign(&payload("r", "web", "alice"), &key(ALICE), None);
        let w: serde_json::Value = serde_json::from_slice(&good).unwrap();
        let sig = w["customer_signature"].as_str().unwrap().to_string();
        let pay = w["payload"].as_str().unwrap().to_string();
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "malformed envelope: EOF"),
            ("not json".into(), "malformed envelope: expected"),
            (
                "[]".into(),
                "malformed envelope: not a JSON object but an array",
            ),
            (
                format!(r#"["{pay}","{sig}",null]"#),
                "malformed envelope: not a JSON object but an array",
            ),
            (
                format!(r#"{{"payload":"{pay}"}}"#),
                "malformed envelope: missing field `customer_signature`",
            ),
            (
                format!(r#"{{"payload":"{pay}","customer_signature":"{sig}","x":1}}"#),
                "malformed envelope: unknown field `x`",
            ),
            (
                format!(r#"{{"payload":"%%%","customer_signature":"{sig}"}}"#),
                "bad base64 in payload",
            ),
            (
                format!(
                    r#"{{"payload":"{}","customer_signature":"{sig}"}}"#,
                    // 73 bytes: padded with "=", which is left out here.
                    STANDARD
                        .encode([&payload("r", "web", "alice")[..], b" "].concat())
                        .trim_end_matches('=')
                ),
                "bad base64 in payload",
            ),
            (
                format!(r#"{{"payload":"{pay}","customer_signature":"AAAA"}}"#),
                "customer_signature is 3 bytes",
            ),
            (
                format!(
                    r#"{{"payload":"{pay}","customer_signature":"{sig}","sponsor_signature":"!"}}"#
                ),
                "bad base64 in sponsor_signature",
            ),
            (
                format!(
                    r#"{{"payload":"{pay}","customer_signature":"{sig}","sponsor_signature":7}}"#
                ),
                "malformed envelope: invalid type",
            ),
        ];
        for (env, want) in cases {
            let e = err(env.as_bytes());
            assert!(e.starts_with(want), "{env}: {e}");
        }
        // sponsor_signature: null is the same as absent.
        let env = format!(
            r#"{{"payload":"{pay}","customer_signature":"{sig}","sponsor_signature":null}}"#
        );
        assert!(check(env.as_bytes()).is_ok());

        let mut big = good.clone();
        big.resize(MAX_ENVELOPE + 1, b' ');
        assert_eq!(
            err(&big),
            format!(
                "oversized envelope: {} bytes, at most 65536 are accepted",
                MAX_ENVELOPE + 1
            )
        );
        // Trailing spaces within the bound are fine JSON.
        big.truncate(MAX_ENVELOPE);
        assert!(check(&big).is_ok());
    }

    proptest! {
        #[test]
        fn any_amounts_round_trip(id in "[a-z0-9-]{1,40}", cu: u64, su: u64, ipv4u: u64) {
            let r = Reservation { id, pool: "web".into(), customer: "alice".into(), cu, su, ipv4u };
            prop_assert_eq!(Reservation::parse(&r.to_payload()).unwrap(), r);
        }

        #[test]
        fn any_changed_payload_byte_is_refused(at in 0usize..72, flip in 1u8..=255) {
            let p = payload("r1", "web", "alice");
            prop_assume!(at < p.len());
            let mut e = Envelope::parse(&sign(&p, &key(ALICE), None)).unwrap();
            e.payload[at] ^= flip;
            prop_assert!(check(&e.to_json()).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = check(&bytes);
            let _ = Reservation::parse(&bytes);
        }
    }
}
