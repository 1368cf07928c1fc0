//! `X-Hub-Signature-256` (CLOUD_API.md §2): HMAC-SHA256 of the raw body
//! bytes with the app secret, compared in constant time. Several secrets
//! may be configured during a rotation; any may match.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::domain::Secret;

type HmacSha256 = Hmac<Sha256>;

/// The header Meta signs notifications with.
pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";

/// `sha256=<lower-case hex HMAC-SHA256(secret, body)>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `header` is a valid signature of `body` under any of `secrets`.
/// Malformed headers (no `sha256=`, not 64 hex digits) never match.
pub fn verify(body: &[u8], header: Option<&str>, secrets: &[Secret]) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let mut sig = [0u8; 32];
    if hex_sig.len() != 64 || hex::decode_to_slice(hex_sig, &mut sig).is_err() {
        return false;
    }
    let mut ok = false;
    for secret in secrets {
        let mut mac = HmacSha256::new_from_slice(secret.expose().as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(body);
        // verify_slice compares in constant time; check every secret.
        ok |= mac.verify_slice(&sig).is_ok();
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog")
        assert_eq!(
            sign(b"key", b"The quick brown fox jumps over the lazy dog"),
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn any_configured_secret_matches() {
        let body = br#"{"object":"whatsapp_business_account","entry":[]}"#;
        let secrets = [Secret::new("old"), Secret::new("new")];
        assert!(verify(body, Some(&sign(b"new", body)), &secrets));
        assert!(verify(body, Some(&sign(b"old", body)), &secrets));
        assert!(!verify(body, Some(&sign(b"other", body)), &secrets));
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
            assert!(!verify(body, bad, &secrets), "{bad:?}");
        }
        assert!(!verify(b"{} ", Some(&good), &secrets), "another body");
        assert!(
            verify(
                body,
                Some(&good.to_uppercase().replace("SHA256=", "sha256=")),
                &secrets
            ),
            "hex case does not matter"
        );
    }
}
