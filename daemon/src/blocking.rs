//! Blocking file-system work handed off in runs instead of one thread wake-up per item.
//!
//! `tokio::task::spawn_blocking` per file wakes a pool thread for every read the scanner
//! makes and every write the projector makes. On an initial sync of 100k small files
//! (2 cores) those wake-ups and the threads' waits were about a seventh of the process's
//! CPU time (`futex` calls; BENCHMARKS.md). A [`Runner`] queues each job and keeps at most
//! a few pool threads draining the queue: a thread that finishes a job takes the next one
//! without waiting to be woken, and a job queued while every such thread is busy costs no
//! wake-up at all.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Pool threads draining `jobs` now.
    draining: usize,
}

/// Runs blocking jobs on tokio's blocking pool, at most `threads` of them at once.
#[derive(Clone)]
pub struct Runner {
    queue: Arc<Mutex<Queue>>,
    threads: usize,
}

/// The job panicked; what it was doing is unknown.
#[derive(Debug, thiserror::Error)]
#[error("the task running it panicked")]
pub struct Panicked;

impl Runner {
    /// A runner that keeps at most `threads` (at least 1) pool threads busy.
    pub fn new(threads: usize) -> Runner {
        Runner {
            queue: Arc::default(),
            threads: threads.max(1),
        }
    }

    /// The number of threads that suits blocking file-system work on this machine: enough
    /// to keep a disk's queue busy while others wait on it, few enough that each thread
    /// usually finds the next job already queued.
    pub fn for_files() -> Runner {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Runner::new((cores * 2).max(4))
    }

    /// Runs `job` on a pool thread and returns what it returned.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Panicked> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock().unwrap();
            q.jobs.push_back(Box::new(move || {
                // The receiver may be gone (its caller stopped waiting); the work is done.
                let _ = tx.send(job());
            }));
            let start = q.draining < self.threads;
            q.draining += usize::from(start);
            start
        };
        if start {
            let queue = self.queue.clone();
            tokio::task::spawn_blocking(move || drain(&queue));
        }
        rx.await.map_err(|_| Panicked)
    }
}

/// Runs queued jobs until none is left. A job that panics drops its sender, which its
/// caller sees as [`Panicked`]; the thread goes on with the next one.
fn drain(queue: &Mutex<Queue>) {
    loop {
        let job = {
            let mut q = queue.lock().unwrap();
            match q.jobs.pop_front() {
                Some(job) => job,
                None => {
                    q.draining -= 1;
                    return;
                }
            }
        };
        let _ = catch_unwind(AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_job_runs_once_with_at_most_the_set_number_of_threads_at_once() {
        let runner = Runner::new(3);
        let busy = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let jobs = (0..200u64).map(|i| {
            let (busy, most) = (busy.clone(), most.clone());
            runner.run(move || {
                let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_micros(200));
                busy.fetch_sub(1, Ordering::SeqCst);
                i * 2
            })
        });
        let out: Vec<u64> = futures::future::join_all(jobs)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(out, (0..200).map(|i| i * 2).collect::<Vec<_>>());
        let most = most.load(Ordering::SeqCst);
        assert!((1..=3).contains(&most), "{most} jobs ran at once");
        // A thread finds the queue empty and leaves just after its last job answered.
        let draining = || runner.queue.lock().unwrap().draining;
        for _ in 0..200 {
            if draining() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(draining(), 0, "threads still draining an empty queue");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_panics_fails_alone() {
        let runner = Runner::new(1);
        let bad = runner.run(|| -> u32 { panic!("boom") });
        let good = runner.run(|| 7u32);
        let (bad, good) = tokio::join!(bad, good);
        assert!(bad.is_err());
        assert_eq!(good.unwrap(), 7);
    }
}
