//! Hot reload of `routes.toml`: on SIGHUP and when the file changes.
//!
//! The parent folder is watched (editors often replace a file by renaming
//! over it); events are debounced so one save compiles once.

use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::Rules;

const DEBOUNCE: Duration = Duration::from_millis(150);

/// Watch the rule file and SIGHUP until `stop` fires.
pub fn spawn(rules: Arc<Rules>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let file = rules.path().to_path_buf();
    let name = file.file_name().map(|n| n.to_os_string());
    let dir = file
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                p
            }
        })
        .map(|p| p.to_path_buf());
    let watch_tx = tx.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !event.kind.is_access()
            && event
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
        {
            let _ = watch_tx.send(());
        }
    });
    let watcher = match watcher {
        Ok(mut w) => {
            let dir = dir.unwrap_or_else(|| ".".into());
            match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the rule file; reload with SIGHUP");
                    None
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the rule file; reload with SIGHUP");
            None
        }
    };
    #[cfg(unix)]
    {
        let hup_tx = tx.clone();
        tokio::spawn(async move {
            if let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading rules");
                    if hup_tx.send(()).is_err() {
                        break;
                    }
                }
            }
        });
    }
    tokio::spawn(async move {
        let _keep = watcher;
        loop {
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() { break; }
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                    rules.reload();
                }
                _ = stop.changed() => break,
            }
        }
    });
}
