//! What the archive (finished records and conversation history in SQLite,
//! `src/archive.rs`) costs a message as it fills. Prints figures; run
//! with `cargo bench --bench archive` (`-- 100000 1000000` for other
//! sizes, `-- --durable …` for an archive in a data_dir on this disk;
//! `-- --probe` for what a read that finds nothing costs as parts add up).
//!
//! Each message is what one answered inbound message leaves there: its
//! reply's record (a time-sorted id, a random recipient and wamid, as in
//! a campaign to distinct contacts) and two history entries (the inbound
//! message and the reply) of the recipient's conversation. Rows are handed
//! over as fast as the writer takes them (the router's intake waits past
//! the same backlog), and the clock stops once all are committed. CPU is
//! the whole process's (the writer thread does nearly all of it).

use std::time::Instant;

use wa_router::archive::{Archive, HistoryRow, MAX_BACKLOG_ROWS, RecordRow};
use wa_router::ids::MessageId;

/// The binary's allocator (`src/main.rs`).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const RECORD_BYTES: usize = 400;
const HISTORY_BYTES: usize = 200;

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn fill(archive: &Archive, messages: usize) {
    let (record, entry) = (vec![b'r'; RECORD_BYTES], vec![b'h'; HISTORY_BYTES]);
    for _ in 0..messages {
        let to = (10_000_000_000 + fastrand::u64(..1_000_000_000)).to_string();
        archive.put_record(RecordRow {
            id: MessageId::generate().to_string(),
            account: "main".into(),
            to: to.clone(),
            status: "read",
            wamid: Some(format!("wamid.HBgL{:032x}", fastrand::u128(..))),
            created_at: wa_router::domain::now_ms(),
            tags: Vec::new(),
            body: record.clone(),
            version: 1,
        });
        for seq in 1..=2 {
            archive.put_history(HistoryRow {
                account: "main".into(),
                contact: to.clone(),
                seq,
                at: wa_router::domain::now_ms(),
                body: entry.clone(),
            });
        }
        while archive.backlog() > MAX_BACKLOG_ROWS {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let durable = args.iter().any(|a| a == "--durable");
    if args.iter().any(|a| a == "--probe") {
        return probe(durable).await;
    }
    let mut sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![100_000, 1_000_000];
    }
    println!(
        "archive: {} mode, one record ({RECORD_BYTES} B) and two history entries ({HISTORY_BYTES} B) a message",
        if durable { "durable" } else { "memory" }
    );
    // Durable mode: the files' size after the last commit (database and
    // WAL), a message's share of the disk.
    println!("messages,seconds,messages_per_s,cpu_us_per_message,disk_bytes_per_message");
    for n in sizes {
        let dir = tempfile::tempdir_in(".").expect("a directory here");
        let archive = Archive::open(durable.then_some(dir.path())).expect("archive opens");
        let (start, cpu) = (Instant::now(), cpu_seconds());
        fill(&archive, n);
        archive.sync().await.expect("archive commits");
        let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        let per_message = if durable {
            let disk: u64 = std::fs::read_dir(dir.path())
                .expect("the directory lists")
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum();
            (disk / n as u64).to_string()
        } else {
            "-".into()
        };
        println!(
            "{n},{secs:.2},{:.0},{:.1},{per_message}",
            n as f64 / secs,
            cpu * 1e6 / n as f64
        );
        archive.close();
    }
}

/// Messages a part holds in `probe` (3 rows each).
const PROBE_PART_MESSAGES: usize = 3_000;

/// A read that finds nothing looks into every part: a status for a wamid
/// the archive does not hold (a message sent by another tool on the same
/// number), the history of a contact with none. Small parts stand in for
/// the full ones (a lookup is an index seek in each part either way).
async fn probe(durable: bool) {
    println!(
        "archive: unknown wamid and empty history, by parts ({PROBE_PART_MESSAGES} messages a part)"
    );
    println!("parts,wamid_us,history_us");
    for parts in [1usize, 10, 100, 300, 600] {
        let dir = tempfile::tempdir_in(".").expect("a directory here");
        let archive = Archive::open_parted(
            durable.then_some(dir.path()),
            3 * PROBE_PART_MESSAGES as u64,
        )
        .expect("archive opens");
        // A commit into a full part starts the next one.
        for _ in 0..parts {
            fill(&archive, PROBE_PART_MESSAGES);
            archive.sync().await.expect("archive commits");
        }
        let reads = 200;
        let start = Instant::now();
        for i in 0..reads {
            assert!(
                archive
                    .record_by_wamid(&format!("wamid.unknown{i}"))
                    .is_none()
            );
        }
        let wamid = start.elapsed().as_secs_f64() * 1e6 / reads as f64;
        let start = Instant::now();
        for i in 0..reads {
            assert!(
                archive
                    .history("main", &format!("silent{i}"), 20)
                    .is_empty()
            );
        }
        let history = start.elapsed().as_secs_f64() * 1e6 / reads as f64;
        println!("{},{wamid:.0},{history:.0}", archive.part_count());
        archive.close();
    }
}
