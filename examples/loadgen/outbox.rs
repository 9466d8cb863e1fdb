//! The codes as the phones receive them: the development provider's outbox (one JSON line per
//! message, `{"to": "+1555...", "code": "123456", ...}`), followed from a thread of its own.

use std::collections::HashMap;
use std::io::{BufRead as _, Seek as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Codes seen in the outbox and not taken yet, by number.
#[derive(Clone, Default)]
pub struct Codes(Arc<Mutex<HashMap<String, String>>>);

/// How long a code may take to reach the outbox after its start was answered.
const CODE_WAIT: Duration = Duration::from_secs(10);

impl Codes {
    /// Follows the outbox at `path` from its current end, recording each line's number and code.
    pub fn follow(path: PathBuf) -> Self {
        let codes = Self::default();
        let map = codes.0.clone();
        std::thread::spawn(move || {
            // An outbox that is there already holds earlier runs' codes: follow it from its end.
            // One that is not is followed from its first line once the service makes it.
            let mut file = std::fs::File::open(&path).ok();
            if let Some(f) = file.as_mut() {
                let _ = f.seek(std::io::SeekFrom::End(0));
            }
            let file = loop {
                match file
                    .take()
                    .map(Ok)
                    .unwrap_or_else(|| std::fs::File::open(&path))
                {
                    Ok(f) => break f,
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            };
            let mut reader = std::io::BufReader::new(file);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => std::thread::sleep(Duration::from_micros(500)),
                    Ok(_) if !line.ends_with('\n') => {
                        // A line still being written: read on from where it stopped next time.
                        let back = -(line.len() as i64);
                        let _ = reader.seek_relative(back);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Ok(_) => {
                        if let Ok(v) = serde_json::from_str::<Value>(&line)
                            && let (Some(to), Some(code)) = (v["to"].as_str(), v["code"].as_str())
                        {
                            map.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(to.to_owned(), code.to_owned());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        codes
    }

    /// The code sent to `phone` (E.164), once it is in the outbox.
    pub async fn wait(&self, phone: &str) -> Result<String, String> {
        let since = Instant::now();
        loop {
            if let Some(c) = self
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(phone)
            {
                return Ok(c);
            }
            if since.elapsed() > CODE_WAIT {
                return Err(format!("no code in the outbox within {CODE_WAIT:?}"));
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
}
