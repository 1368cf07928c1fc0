//! `webhook::payload::parse` on arbitrary bytes: never panics, and whatever
//! it returns can be walked and formatted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wa_router::webhook::payload;

fuzz_target!(|data: &[u8]| {
    match payload::parse(data) {
        Ok(n) => {
            let mut count = 0usize;
            for b in &n.batches {
                for m in &b.messages {
                    count += m.wamid.len() + m.from.len() + m.raw.get().len();
                    let _ = m.kind.as_str();
                }
                count += b.statuses.len();
            }
            std::hint::black_box(count);
            std::hint::black_box(format!("{n:?}"));
        }
        Err(e) => {
            std::hint::black_box(e.to_string());
        }
    }
});
