//! Continuous batching: one thread owns the model and runs one decode batch; requests join it
//! at token boundaries and leave when they finish, are cancelled or time out.
//!
//! The HTTP side never touches the model. It checks and tokenizes a request, [`Scheduler::submit`]s
//! it (or is told the queue is full), and reads the request's [`Event`]s from a channel. A
//! request whose receiver is gone (its client disconnected) is dropped from the batch at the
//! next token boundary, so its slot is free for the next one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::generate::{DecodeBatch, Generated, Sequence};
use crate::model::Model;
use crate::tokenizer::TextTokenizer;

/// How much the server takes on at once.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Rows decoded together at most.
    pub max_batch: usize,
    /// Positions (prompts plus their budgets) the rows of the batch may reserve together; a
    /// row larger than this alone still runs when the batch is empty.
    pub max_batch_tokens: usize,
    /// Requests waiting to start at most; one more is answered 429.
    pub max_queue: usize,
    /// From arrival to the last token.
    pub timeout: Duration,
}

/// What a request asks of the model.
pub enum Work {
    /// Continue each sequence (a request's instances, in order).
    Generate(Vec<Sequence>),
    /// The log-likelihood of every candidate after every prompt.
    Score {
        prompts: Vec<Vec<u32>>,
        candidates: Vec<Vec<u32>>,
    },
}

/// What the scheduler tells a request, in order.
#[derive(Debug)]
pub enum Event {
    Token {
        instance: usize,
        token: u32,
    },
    Done {
        instance: usize,
        generated: Generated,
    },
    Scored(Vec<Vec<f32>>),
    TimedOut,
    Failed(String),
}

/// The request queue is full; try again later.
#[derive(Debug)]
pub struct Busy {
    pub retry_after_secs: u64,
}

struct Job {
    id: u64,
    work: Work,
    events: mpsc::UnboundedSender<Event>,
    deadline: Instant,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    next_id: u64,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// The submitting side, shared by the HTTP handlers.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    /// Starts the scheduler thread, which owns `model` until [`Scheduler::close`] and then
    /// finishes what it has.
    pub fn start(
        model: Model,
        tokenizer: Arc<TextTokenizer>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, std::thread::JoinHandle<()>)> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let worker = Worker {
            shared: shared.clone(),
            limits: limits.clone(),
            metrics: metrics.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("kiln-scheduler".into())
            .spawn(move || worker.run(&model, &tokenizer))?;
        Ok((
            Self {
                shared,
                limits,
                metrics,
            },
            handle,
        ))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Queues `work`; its events arrive on the returned channel. Dropping the receiver cancels it.
    pub fn submit(&self, work: Work) -> Result<mpsc::UnboundedReceiver<Event>, Busy> {
        let (events, receiver) = mpsc::unbounded_channel();
        let mut queue = self.shared.queue.lock().expect("queue lock");
        if queue.jobs.len() >= self.limits.max_queue || queue.closed {
            // A waiting request takes about a decode of its budget; a second is an honest hint
            // on a CPU, and clients back off from there.
            return Err(Busy {
                retry_after_secs: 1,
            });
        }
        queue.next_id += 1;
        let id = queue.next_id;
        queue.jobs.push_back(Job {
            id,
            work,
            events,
            deadline: Instant::now() + self.limits.timeout,
        });
        self.metrics.queue_depth.set(queue.jobs.len() as i64);
        self.shared.wake.notify_one();
        Ok(receiver)
    }

    /// Takes no more work; the thread exits once everything queued and running is done.
    pub fn close(&self) {
        self.shared.queue.lock().expect("queue lock").closed = true;
        self.shared.wake.notify_all();
    }
}

/// A row of the decode batch: which request, which of its instances.
#[derive(Debug, Clone, Copy)]
struct RowTag {
    job: u64,
    instance: usize,
}

/// A request with rows in the batch (or waiting to join it).
struct Running {
    events: mpsc::UnboundedSender<Event>,
    deadline: Instant,
    unfinished: usize,
}

struct Worker {
    shared: Arc<Shared>,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(self, model: &Model, tokenizer: &TextTokenizer) {
        crate::model::keep_freed_memory();
        let mut batch: DecodeBatch<RowTag> = DecodeBatch::new(model, Some(tokenizer));
        let mut running: HashMap<u64, Running> = HashMap::new();
        // Rows of admitted requests that have not joined the batch yet (over the limits).
        let mut waiting: VecDeque<(RowTag, Sequence)> = VecDeque::new();
        loop {
            let idle = batch.is_empty() && waiting.is_empty();
            let free_rows = self.limits.max_batch.saturating_sub(batch.len());
            let Some(jobs) = self.take_jobs(idle, free_rows, &waiting) else {
                return;
            };
            for job in jobs {
                match job.work {
                    Work::Score {
                        prompts,
                        candidates,
                    } => {
                        let scored = rayon::scope(|_| {
                            crate::eval::score::score_continuations(model, &prompts, &candidates, 8)
                        });
                        let _ = job.events.send(match scored {
                            Ok(scores) => Event::Scored(scores),
                            Err(e) => Event::Failed(format!("{e:#}")),
                        });
                    }
                    Work::Generate(sequences) => {
                        let unfinished = sequences.len();
                        let tags = (0..sequences.len()).map(|instance| RowTag {
                            job: job.id,
                            instance,
                        });
                        waiting.extend(tags.zip(sequences));
                        running.insert(
                            job.id,
                            Running {
                                events: job.events,
                                deadline: job.deadline,
                                unfinished,
                            },
                        );
                    }
                }
            }
            if let Err(e) = self.step(&mut batch, &mut running, &mut waiting) {
                // A failed forward pass fails every request in the batch, not the server.
                let message = format!("{e:#}");
                tracing::error!(error = %message, "decode step failed");
                for (_, request) in running.drain() {
                    let _ = request.events.send(Event::Failed(message.clone()));
                }
                waiting.clear();
                batch = DecodeBatch::new(model, Some(tokenizer));
            }
            self.metrics.batch_rows.set(batch.len() as i64);
        }
    }

    /// The jobs to start now: waits for one when there is nothing to do; `None` once the queue is
    /// closed and drained. Jobs only leave the queue while no admitted rows are still waiting,
    /// so the queue (and its limit) is where back-pressure shows.
    fn take_jobs(
        &self,
        idle: bool,
        free_rows: usize,
        waiting: &VecDeque<(RowTag, Sequence)>,
    ) -> Option<Vec<Job>> {
        let mut queue = self.shared.queue.lock().expect("queue lock");
        if idle {
            while queue.jobs.is_empty() {
                if queue.closed {
                    return None;
                }
                queue = self.shared.wake.wait(queue).expect("queue lock");
            }
        }
        let mut jobs = Vec::new();
        if waiting.is_empty() {
            let now = Instant::now();
            let mut rows = 0;
            while let Some(job) = queue.jobs.pop_front() {
                if job.events.is_closed() {
                    self.metrics.cancelled.inc();
                    continue;
                }
                if now > job.deadline {
                    self.metrics.timed_out.inc();
                    let _ = job.events.send(Event::TimedOut);
                    continue;
                }
                // Requests that fit the free rows join together (one prefill pass, one cache
                // rebuild); the first always comes, and waits in `waiting` if it does not fit.
                if let Work::Generate(sequences) = &job.work {
                    if rows > 0 && rows + sequences.len() > free_rows {
                        queue.jobs.push_front(job);
                        break;
                    }
                    rows += sequences.len();
                }
                jobs.push(job);
            }
        }
        self.metrics.queue_depth.set(queue.jobs.len() as i64);
        Some(jobs)
    }

    /// One token boundary: drop cancelled and late rows, let waiting rows join within the
    /// limits, then choose every row's next token.
    fn step(
        &self,
        batch: &mut DecodeBatch<RowTag>,
        running: &mut HashMap<u64, Running>,
        waiting: &mut VecDeque<(RowTag, Sequence)>,
    ) -> Result<()> {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (&id, request) in running.iter() {
            if request.events.is_closed() {
                self.metrics.cancelled.inc();
                gone.push(id);
            } else if now > request.deadline {
                // Counted before the client hears of it, so /metrics agrees with what it saw.
                self.metrics.timed_out.inc();
                let _ = request.events.send(Event::TimedOut);
                gone.push(id);
            }
        }
        if !gone.is_empty() {
            for id in &gone {
                running.remove(id);
            }
            batch.remove(|tag| gone.contains(&tag.job))?;
            waiting.retain(|(tag, _)| !gone.contains(&tag.job));
        }

        let mut joining = Vec::new();
        let mut rows = batch.len();
        let mut reserved = batch.reserved_positions();
        while let Some((_, sequence)) = waiting.front() {
            let size = sequence.max_positions();
            let fits = rows < self.limits.max_batch
                && (reserved + size <= self.limits.max_batch_tokens || rows == 0);
            if !fits {
                break;
            }
            rows += 1;
            reserved += size;
            joining.push(waiting.pop_front().expect("front exists"));
        }
        if !joining.is_empty() {
            let prompt_tokens: usize = joining.iter().map(|(_, s)| s.prompt().len()).sum();
            self.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
            let finished = batch.join(joining)?;
            self.metrics.batch_rows.set(batch.len() as i64);
            for (tag, generated) in finished {
                finish(running, tag, generated);
            }
        }
        if batch.is_empty() {
            return Ok(());
        }

        let started = Instant::now();
        let rows_before = batch.len();
        let finished = batch.advance(&mut |tag, token| {
            if let Some(request) = running.get(&tag.job) {
                let _ = request.events.send(Event::Token {
                    instance: tag.instance,
                    token,
                });
            }
        })?;
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.generated_tokens.inc_by(rows_before as u64);
        self.metrics.decode_batch_rows.observe(rows_before as f64);
        if seconds > 0.0 {
            self.metrics
                .tokens_per_second
                .set(rows_before as f64 / seconds);
        }
        self.metrics.batch_rows.set(batch.len() as i64);
        for (tag, generated) in finished {
            finish(running, tag, generated);
        }
        Ok(())
    }
}

fn finish(running: &mut HashMap<u64, Running>, tag: RowTag, generated: Generated) {
    let Some(request) = running.get_mut(&tag.job) else {
        return;
    };
    let _ = request.events.send(Event::Done {
        instance: tag.instance,
        generated,
    });
    request.unfinished -= 1;
    if request.unfinished == 0 {
        running.remove(&tag.job);
    }
}
