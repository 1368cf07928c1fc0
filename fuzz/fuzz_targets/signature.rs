//! `crypto::verify_any` never panics, accepts exactly the signatures
//! `sign` makes (hex case and surrounding white space aside), and rejects
//! any other header.
//!
//! Input: `BODY [0xFF SECRET [0xFF HEADER]]`. 0xFF never occurs in UTF-8, so
//! a raw webhook fixture is a body signed with the default secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wa_router::domain::Secret;
use wa_router::crypto::{sign, verify_any as verify};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0xFF);
    let body = parts.next().unwrap_or_default();
    let secret = parts
        .next()
        .map_or_else(|| "app-secret".to_string(), |s| String::from_utf8_lossy(s).into_owned());
    let header = parts.next().map(|h| String::from_utf8_lossy(h).into_owned());

    let secrets = [Secret::new(secret.clone())];
    let good = sign(secret.as_bytes(), body);
    assert!(good.starts_with("sha256=") && good.len() == 7 + 64, "{good}");

    // The signature sign() makes always verifies, alone or among others.
    assert!(verify(body, Some(&good), &secrets), "own signature rejected");
    let rotated = [Secret::new(format!("{secret}-old")), Secret::new(secret.clone())];
    assert!(verify(body, Some(&good), &rotated), "own signature rejected among two secrets");
    let upper = format!("sha256={}", good[7..].to_ascii_uppercase());
    assert!(verify(body, Some(&upper), &secrets), "upper-case hex rejected");
    assert!(verify(body, Some(&format!(" {good}\t")), &secrets), "padded header rejected");

    // No header, no secret, a changed digit, a cut signature: never.
    assert!(!verify(body, None, &secrets));
    assert!(!verify(body, Some(&good), &[]));
    let pos = 7 + body.len() % 64;
    let mut flipped = good.clone().into_bytes();
    flipped[pos] = if flipped[pos] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    assert!(!verify(body, Some(&flipped), &secrets), "one changed digit accepted");
    assert!(!verify(body, Some(&good[..good.len() - 1]), &secrets), "63 digits accepted");
    assert!(!verify(body, Some(&good[7..]), &secrets), "no sha256= prefix accepted");

    // Any other header: true only if it is the same signature.
    if let Some(h) = header.as_deref() {
        let ok = verify(body, Some(h), &secrets);
        let same = h
            .trim()
            .strip_prefix("sha256=")
            .is_some_and(|hex| hex.eq_ignore_ascii_case(&good[7..]));
        assert_eq!(ok, same, "header {h:?} vs {good}");
        // With the header taken as the secret too: no panic.
        let _ = verify(h.as_bytes(), Some(h), &[Secret::new(h)]);
    }
});
