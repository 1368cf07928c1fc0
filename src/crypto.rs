//! Every signature and secret comparison of the router, in one place:
//! HMAC-SHA256 signing and checking (Meta's `X-Hub-Signature-256`, the
//! router's own event signatures) and constant-time equality (API keys,
//! the verify token, the ops key).

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::Secret;

type HmacSha256 = Hmac<Sha256>;

/// The key a request presents, from its `X-API-Key` header or else its
/// `Authorization: Bearer KEY` header (API keys and the ops key).
pub fn presented_key<'a>(
    x_api_key: Option<&'a str>,
    authorization: Option<&'a str>,
) -> Option<&'a str> {
    if let Some(k) = x_api_key {
        return Some(k.trim());
    }
    let (scheme, token) = authorization?.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC is defined for keys of any length; new_from_slice never fails.
    match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// `sha256=<lower-case hex HMAC-SHA256(secret, body)>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut m = mac(secret);
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

/// The timestamped signature of `body` at `timestamp` (unix seconds):
/// `sign(secret, "{timestamp}.{body}")`, as Standard Webhooks signs.
pub fn sign_timestamped(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut m = mac(secret);
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

/// Whether `header` (`sha256=<hex>`) is a valid signature of `body` under
/// any of `secrets` (several during a rotation). Malformed headers (no
/// `sha256=`, not 64 hex digits) never match. Every secret is checked, in
/// constant time.
pub fn verify_any(body: &[u8], header: Option<&str>, secrets: &[Secret]) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let mut sig = [0u8; 32];
    if hex_sig.len() != 64 || hex::decode_to_slice(hex_sig, &mut sig).is_err() {
        return false;
    }
    let mut ok = false;
    for secret in secrets {
        let mut m = mac(secret.expose().as_bytes());
        m.update(body);
        ok |= m.verify_slice(&sig).is_ok();
    }
    ok
}

/// Equality that takes the same time wherever the inputs differ, and
/// whatever their lengths (both sides are hashed first).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    bool::from(da.as_slice().ct_eq(db.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_comes_from_x_api_key_or_a_bearer_token() {
        assert_eq!(presented_key(Some(" k1 "), Some("Bearer k2")), Some("k1"));
        assert_eq!(presented_key(None, Some("bearer  k2 ")), Some("k2"));
        assert_eq!(presented_key(None, Some("Basic k2")), None);
        assert_eq!(presented_key(None, Some("k2")), None);
        assert_eq!(presented_key(None, None), None);
    }

    #[test]
    fn known_vector() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog")
        assert_eq!(
            sign(b"key", b"The quick brown fox jumps over the lazy dog"),
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn timestamped_signature_covers_timestamp_dot_body() {
        assert_eq!(sign_timestamped(b"k", 17, b"{}"), sign(b"k", b"17.{}"));
    }

    #[test]
    fn any_configured_secret_matches() {
        let body = br#"{"object":"whatsapp_business_account","entry":[]}"#;
        let secrets = [Secret::new("old"), Secret::new("new")];
        assert!(verify_any(body, Some(&sign(b"new", body)), &secrets));
        assert!(verify_any(body, Some(&sign(b"old", body)), &secrets));
        assert!(!verify_any(body, Some(&sign(b"other", body)), &secrets));
    }

    #[test]
    fn malformed_headers_never_match() {
        let body = b"{}";
        let secrets = [Secret::new("s")];
        let good = sign(b"s", body);
        for bad in [
            None,
            Some(""),
            Some("sha256="),
            Some("sha256=zz"),
            Some(&good[7..]),
            Some("sha1=abcdef"),
        ] {
            assert!(!verify_any(body, bad, &secrets), "{bad:?}");
        }
        assert!(!verify_any(b"{} ", Some(&good), &secrets), "another body");
        assert!(
            verify_any(
                body,
                Some(&good.to_uppercase().replace("SHA256=", "sha256=")),
                &secrets
            ),
            "hex case does not matter"
        );
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
