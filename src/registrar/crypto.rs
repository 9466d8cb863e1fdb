//! The bounded pool for cryptographic work (parsing and checking users' keys, certifying,
//! verifying bridge certificates and signatures). It runs on tokio's blocking threads, at most
//! `permits` jobs at once, with at most `queue` more waiting; beyond that a request is refused
//! at once with [`Error::Busy`] and a time to retry. So a flood of junk keys costs at most the
//! cores it is given and a bounded queue, and work that is not cryptographic (phone parsing,
//! starts) is never queued behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;

use super::Error;

/// How long a refused request is told to wait.
pub const BUSY_RETRY_SECS: i64 = 1;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct CryptoPool {
    permits: Arc<Semaphore>,
    /// Jobs running or waiting.
    waiting: Arc<AtomicUsize>,
    /// Jobs that may be running or waiting at once.
    capacity: usize,
}

/// Decrements the waiting count when a job leaves the queue, however it leaves.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CryptoPool {
    /// A pool running `permits` jobs at once with `queue` more waiting.
    pub fn new(permits: usize, queue: usize) -> Self {
        let permits = permits.max(1);
        Self {
            permits: Arc::new(Semaphore::new(permits)),
            waiting: Arc::new(AtomicUsize::new(0)),
            capacity: permits + queue,
        }
    }

    /// As many jobs at once as the machine has cores, and 64 waiting per core.
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::new(cores, 64 * cores)
    }

    /// Runs `job` on a blocking thread when a permit is free; [`Error::Busy`] when the queue
    /// is full.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("cryptographic work queue full: refusing a request");
            return Err(Error::Busy {
                retry_at: chrono::Utc::now() + chrono::Duration::seconds(BUSY_RETRY_SECS),
            });
        }
        let waiting = Waiting(&self.waiting);
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| {
            tracing::error!("the cryptographic pool is closed");
            Error::Internal
        })?;
        let result = tokio::task::spawn_blocking(move || {
            let out = job();
            drop(permit);
            out
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cryptographic task failed");
            Error::Internal
        });
        drop(waiting);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_most_the_permits_run_and_the_queue_is_bounded() {
        let pool = CryptoPool::new(1, 1);
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let running = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = hold.recv();
                    1
                })
                .await
            })
        };
        // Let the first job take the permit.
        while pool.permits.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let queued = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|| 2).await })
        };
        while pool.waiting.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        // Full: one running, one waiting.
        assert!(matches!(pool.run(|| 3).await, Err(Error::Busy { .. })));
        release.send(()).unwrap();
        assert_eq!(running.await.unwrap().unwrap(), 1);
        assert_eq!(queued.await.unwrap().unwrap(), 2);
        // Room again.
        assert_eq!(pool.run(|| 4).await.unwrap(), 4);
        assert_eq!(pool.waiting.load(Ordering::SeqCst), 0);
    }
}
