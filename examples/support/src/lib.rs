//! The small helpers the chanlayer examples (`task_queue`, `notifications`, `batch_worker`)
//! share: waiting for SIGTERM or Ctrl-C, a `main` that runs on a tokio runtime and turns an
//! error into an exit code, sending with back-pressure, and (in [`testing`]) what their
//! integration tests need to run the example's binary against a real broker.
//!
//! Copy this directory along with an example.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

pub mod testing;

/// This program's name (its executable's file name), for messages on stderr.
fn program() -> String {
    std::env::args()
        .next()
        .and_then(|arg0| {
            std::path::Path::new(&arg0)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "example".to_owned())
}

/// Waits for SIGTERM or Ctrl-C. Where no SIGTERM handler can be installed it says so on
/// stderr and waits for Ctrl-C only.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                eprintln!(
                    "{}: no SIGTERM handler ({e}); stopping on Ctrl-C only",
                    program()
                );
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs `fut` to completion on a multi-threaded tokio runtime: [`ExitCode::SUCCESS`] when
/// it returns `Ok`, else `name: error` on stderr and [`ExitCode::FAILURE`] (as when the
/// runtime cannot start).
pub fn run_main<E: Display>(name: &str, fut: impl Future<Output = Result<(), E>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `send` until the channel has room: a full channel (RabbitMQ keeps `capacity` at the
/// broker) is back-pressure, so wait a little and try again rather than fail. When a batch
/// was refused partway (`PartlySent` caused by `ChannelFull`), `progress` learns how many
/// of it went before the next try. Any other outcome is returned as it is. The first wait
/// is said on stderr, as `name: <the error>; waiting for room`.
pub async fn with_backpressure<F, Fut>(
    name: &str,
    mut send: F,
    mut progress: impl FnMut(usize),
) -> chanlayer::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = chanlayer::Result<()>>,
{
    let mut tries = 0u64;
    loop {
        let full = match send().await {
            Err(e @ chanlayer::Error::ChannelFull { .. }) => e,
            Err(chanlayer::Error::PartlySent { sent, cause, .. })
                if matches!(*cause, chanlayer::Error::ChannelFull { .. }) =>
            {
                progress(sent);
                *cause
            }
            other => return other,
        };
        if tries == 0 {
            eprintln!("{name}: {full}; waiting for room");
        }
        // 10 ms more per try, up to half a second, while the readers catch up.
        tries = (tries + 1).min(50);
        tokio::time::sleep(Duration::from_millis(tries * 10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_main_turns_an_error_into_failure() {
        assert_eq!(
            run_main("t", async { Ok::<(), String>(()) }),
            ExitCode::SUCCESS
        );
        assert_eq!(
            run_main("t", async { Err::<(), _>("no".to_owned()) }),
            ExitCode::FAILURE
        );
    }

    #[test]
    fn with_backpressure_retries_a_full_channel() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let tries = std::cell::Cell::new(0);
        let outcome = rt.block_on(with_backpressure(
            "t",
            || {
                tries.set(tries.get() + 1);
                let n = tries.get();
                async move {
                    if n < 3 {
                        Err(chanlayer::Error::ChannelFull {
                            channel: "c".into(),
                            capacity: 1,
                        })
                    } else {
                        Ok(())
                    }
                }
            },
            |_| {},
        ));
        assert!(outcome.is_ok());
        assert_eq!(tries.get(), 3);
    }
}
