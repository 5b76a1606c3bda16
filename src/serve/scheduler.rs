//! Continuous batching: one thread owns the model and runs one decode batch; requests join it
//! at token boundaries and leave when they finish, fail, are cancelled or time out.
//!
//! The HTTP side never touches the model. It checks and tokenizes a request, [`Scheduler::submit`]s
//! it (or is told the queue is full), and reads the request's [`Event`]s from a channel. A
//! request whose receiver is gone (its client disconnected) is dropped from the batch at the
//! next token boundary, so its slot is free for the next one.
//!
//! No request can hold the others up for long: at each token boundary the thread runs at most
//! one bounded chunk of classification scoring and reads at most `max_prefill_tokens` of new
//! prompts, then decodes one token for every row. Free rows go to the admitted request with the
//! fewest rows in the batch, so a one-prompt request joins at the next free row even while a
//! request of thousands of prompts is running. An error while choosing a row's token fails
//! that row's request alone; if the thread itself dies, the server stops being ready and
//! answers 503 (see [`Scheduler::dead`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::{mpsc, watch};

use super::metrics::Metrics;
use crate::eval::score::{ScorePlan, ScoredRow, TokenLogprobPlan};
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
    /// Prompt tokens read in one prefill pass (the rows joining at one token boundary); one
    /// prompt longer than this still joins alone.
    pub max_prefill_tokens: usize,
    /// Requests waiting to start at most; one more is answered 429.
    pub max_queue: usize,
    /// Prompts (or classification instances) in one request at most; more are answered 413.
    pub max_prompts: usize,
    /// Instances × labels of one classification request at most; more are answered 413.
    pub max_classify_pairs: usize,
    /// Memory one chunk of classification scoring may use for its temporaries.
    pub score_budget_bytes: usize,
    /// From arrival to the last token.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_batch_tokens: 32768,
            max_prefill_tokens: 2048,
            max_queue: 256,
            max_prompts: 4096,
            max_classify_pairs: 16384,
            score_budget_bytes: crate::eval::score::DEFAULT_SCORE_BUDGET_BYTES,
            timeout: Duration::from_secs(300),
        }
    }
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
    /// Every token's log-probability in each row, with the `top` most likely at each position
    /// (OpenAI's `echo` and `logprobs`).
    Logprobs { rows: Vec<Vec<u32>>, top: usize },
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
    Logprobs(Vec<ScoredRow>),
    TimedOut,
    /// The request cannot be run as given (a 400).
    Rejected(String),
    /// Running it failed (a 500); other requests are not affected.
    Failed(String),
}

/// Why [`Scheduler::submit`] did not take a request.
#[derive(Debug)]
pub enum Refused {
    /// The request queue is full; try again later (429).
    Busy { retry_after_secs: u64 },
    /// The scheduler thread has died (503); the server is shutting down.
    Dead(String),
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
    /// Why the scheduler thread died, once it has.
    death: Mutex<Option<String>>,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A panic never happens while the queue is locked, but a dead scheduler must still let
        // the handlers answer.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn death(&self) -> MutexGuard<'_, Option<String>> {
        self.death
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The submitting side, shared by the HTTP handlers.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
    limits: Limits,
    metrics: Arc<Metrics>,
    died: watch::Receiver<bool>,
}

impl Scheduler {
    /// Starts the scheduler thread, which owns `model` until [`Scheduler::close`] and then
    /// finishes what it has. The thread returns `Err` with the panic's message if it died.
    pub fn start(
        model: Model,
        tokenizer: Arc<TextTokenizer>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, std::thread::JoinHandle<Result<(), String>>)> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            death: Mutex::new(None),
        });
        let (died_tx, died) = watch::channel(false);
        let worker = Worker {
            shared: shared.clone(),
            limits: limits.clone(),
            metrics: metrics.clone(),
            panic_for_tests: std::env::var_os(PANIC_FOR_TESTS).is_some(),
        };
        let handle = std::thread::Builder::new()
            .name("kiln-scheduler".into())
            .spawn(move || {
                let shared = worker.shared.clone();
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker.run(&model, &tokenizer)
                }));
                let Err(payload) = outcome else {
                    return Ok(());
                };
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic without a message".into());
                let message = format!("the model's scheduler thread died: {message}");
                tracing::error!(error = %message, "scheduler died; the server is no longer ready");
                *shared.death() = Some(message.clone());
                // Queued requests hear of it at once (their channels close); running ones lost
                // their channels as the thread unwound.
                let mut queue = shared.queue();
                queue.closed = true;
                queue.jobs.clear();
                drop(queue);
                let _ = died_tx.send(true);
                Err(message)
            })?;
        Ok((
            Self {
                shared,
                limits,
                metrics,
                died,
            },
            handle,
        ))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Why the scheduler thread died, if it has: the server then answers 503 and exits.
    pub fn dead(&self) -> Option<String> {
        self.shared.death().clone()
    }

    /// Resolves once the scheduler thread has died (never, while it lives).
    pub async fn died(&self) {
        let mut died = self.died.clone();
        if died.wait_for(|&dead| dead).await.is_err() {
            // The thread ended normally and dropped its side: it did not die.
            std::future::pending::<()>().await;
        }
    }

    /// Queues `work`; its events arrive on the returned channel. Dropping the receiver cancels it.
    pub fn submit(&self, work: Work) -> Result<mpsc::UnboundedReceiver<Event>, Refused> {
        if let Some(message) = self.dead() {
            return Err(Refused::Dead(message));
        }
        let (events, receiver) = mpsc::unbounded_channel();
        let mut queue = self.shared.queue();
        if queue.jobs.len() >= self.limits.max_queue || queue.closed {
            // A waiting request takes about a decode of its budget; a second is an honest hint
            // on a CPU, and clients back off from there.
            return Err(Refused::Busy {
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
        self.shared.queue().closed = true;
        self.shared.wake.notify_all();
    }
}

/// A row of the decode batch: which request, which of its instances.
#[derive(Debug, Clone, Copy)]
struct RowTag {
    job: u64,
    instance: usize,
}

/// An admitted generation request: its rows not yet in the batch, and how many are.
struct Generation {
    events: mpsc::UnboundedSender<Event>,
    deadline: Instant,
    waiting: VecDeque<(usize, Sequence)>,
    in_batch: usize,
    unfinished: usize,
}

/// An admitted scoring request (classification, or log-probabilities), run a chunk at a time.
struct Scoring {
    id: u64,
    events: mpsc::UnboundedSender<Event>,
    deadline: Instant,
    plan: Plan,
}

enum Plan {
    Continuations(ScorePlan),
    Tokens(TokenLogprobPlan),
}

impl Plan {
    fn run_next_chunk(&mut self, model: &Model) -> anyhow::Result<bool> {
        match self {
            Plan::Continuations(plan) => plan.run_next_chunk(model),
            Plan::Tokens(plan) => plan.run_next_chunk(model),
        }
    }

    fn into_event(self) -> Event {
        match self {
            Plan::Continuations(plan) => Event::Scored(plan.into_scores()),
            Plan::Tokens(plan) => Event::Logprobs(plan.into_rows()),
        }
    }
}

/// Everything the scheduler thread is working on.
struct Active<'m> {
    batch: DecodeBatch<'m, RowTag>,
    /// By id, which is arrival order.
    generations: BTreeMap<u64, Generation>,
    scorings: VecDeque<Scoring>,
}

impl Active<'_> {
    fn is_idle(&self) -> bool {
        self.batch.is_empty() && self.generations.is_empty() && self.scorings.is_empty()
    }

    /// Requests admitted that still have work not started (rows waiting, chunks to score).
    fn pending(&self) -> usize {
        self.generations
            .values()
            .filter(|g| !g.waiting.is_empty())
            .count()
            + self.scorings.len()
    }

    /// Ends request `id` with `event` (an error or a timeout), taking its rows out of the batch.
    fn end(&mut self, id: u64, event: Option<Event>) -> Result<()> {
        if let Some(generation) = self.generations.remove(&id) {
            if let Some(event) = event {
                let _ = generation.events.send(event);
            }
            if generation.in_batch > 0 {
                self.batch.remove(|tag| tag.job == id)?;
            }
        }
        Ok(())
    }
}

/// Marks the scheduler dead if the thread unwinds past it (the message follows once the panic
/// is caught).
struct DeathWatch<'a>(&'a Shared);

impl Drop for DeathWatch<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut death = self.0.death();
            death.get_or_insert_with(|| "the model's scheduler thread died".into());
        }
    }
}

/// Set, the scheduler thread panics at the first prompt it is given: the tests' way to check
/// what a dead scheduler does (readiness, 503s, the exit code) now that no input is known to
/// kill it. Nothing else reads it.
pub const PANIC_FOR_TESTS: &str = "KILN_TEST_SCHEDULER_PANIC";

struct Worker {
    shared: Arc<Shared>,
    limits: Limits,
    metrics: Arc<Metrics>,
    panic_for_tests: bool,
}

impl Worker {
    fn run(self, model: &Model, tokenizer: &TextTokenizer) {
        crate::process::keep_freed_memory();
        let mut work = Active {
            batch: DecodeBatch::new(model, Some(tokenizer)),
            generations: BTreeMap::new(),
            scorings: VecDeque::new(),
        };
        // Declared after `work`, so dropped before it as the thread unwinds: the death is known
        // before the requests' channels close, and their handlers answer 503, not 500.
        let _watch = DeathWatch(&self.shared);
        loop {
            let Some(jobs) = self.take_jobs(work.is_idle(), work.pending()) else {
                return;
            };
            for job in jobs {
                self.admit(job, model, &mut work);
            }
            if let Err(e) = self.expire(&mut work) {
                self.fail_batch(&mut work, &e);
            }
            self.score_one_chunk(model, &mut work);
            if let Err(e) = self.step(&mut work) {
                self.fail_batch(&mut work, &e);
            }
            self.metrics.batch_rows.set(work.batch.len() as i64);
        }
    }

    /// A failure that belongs to the whole batch (its forward pass): every request with a row
    /// in it fails, the others go on.
    fn fail_batch(&self, work: &mut Active<'_>, error: &anyhow::Error) {
        let message = format!("{error:#}");
        tracing::error!(error = %message, "decode step failed");
        let in_batch: Vec<u64> = work
            .generations
            .iter()
            .filter(|(_, g)| g.in_batch > 0)
            .map(|(&id, _)| id)
            .collect();
        for id in in_batch {
            if let Some(generation) = work.generations.remove(&id) {
                let _ = generation.events.send(Event::Failed(message.clone()));
            }
        }
        work.batch.clear();
    }

    /// The jobs to admit now: waits for one when there is nothing to do; `None` once the queue is
    /// closed and drained. At most `max_batch` admitted requests have work not yet started, so
    /// the queue (and its limit) is where back-pressure shows.
    fn take_jobs(&self, idle: bool, pending: usize) -> Option<Vec<Job>> {
        let mut queue = self.shared.queue();
        if idle {
            while queue.jobs.is_empty() {
                if queue.closed {
                    return None;
                }
                queue = self
                    .shared
                    .wake
                    .wait(queue)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        }
        let mut jobs = Vec::new();
        let now = Instant::now();
        while pending + jobs.len() < self.limits.max_batch {
            let Some(job) = queue.jobs.pop_front() else {
                break;
            };
            if job.events.is_closed() {
                self.metrics.cancelled.inc();
                continue;
            }
            if now > job.deadline {
                self.metrics.timed_out.inc();
                let _ = job.events.send(Event::TimedOut);
                continue;
            }
            jobs.push(job);
        }
        self.metrics.queue_depth.set(queue.jobs.len() as i64);
        Some(jobs)
    }

    fn admit<'m>(&self, job: Job, model: &'m Model, work: &mut Active<'m>) {
        match job.work {
            Work::Generate(sequences) => {
                work.generations.insert(
                    job.id,
                    Generation {
                        events: job.events,
                        deadline: job.deadline,
                        unfinished: sequences.len(),
                        waiting: sequences.into_iter().enumerate().collect(),
                        in_batch: 0,
                    },
                );
            }
            Work::Score {
                prompts,
                candidates,
            } => {
                let budget = self.limits.score_budget_bytes;
                let plan = ScorePlan::new(model, prompts, candidates, 8, budget);
                self.admit_scoring(
                    job.id,
                    job.events,
                    job.deadline,
                    plan.map(Plan::Continuations),
                    work,
                )
            }
            Work::Logprobs { rows, top } => {
                let budget = self.limits.score_budget_bytes;
                let plan = TokenLogprobPlan::new(model, rows, top, budget);
                self.admit_scoring(
                    job.id,
                    job.events,
                    job.deadline,
                    plan.map(Plan::Tokens),
                    work,
                )
            }
        }
    }

    fn admit_scoring(
        &self,
        id: u64,
        events: mpsc::UnboundedSender<Event>,
        deadline: Instant,
        plan: anyhow::Result<Plan>,
        work: &mut Active<'_>,
    ) {
        match plan {
            Ok(plan) => work.scorings.push_back(Scoring {
                id,
                events,
                deadline,
                plan,
            }),
            Err(e) => {
                let _ = events.send(Event::Rejected(format!("{e:#}")));
            }
        }
    }

    /// Drops cancelled requests and stops late ones.
    fn expire(&self, work: &mut Active<'_>) -> Result<()> {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (&id, generation) in &work.generations {
            if generation.events.is_closed() {
                self.metrics.cancelled.inc();
                gone.push((id, None));
            } else if now > generation.deadline {
                // Counted before the client hears of it, so /metrics agrees with what it saw.
                self.metrics.timed_out.inc();
                gone.push((id, Some(Event::TimedOut)));
            }
        }
        for (id, event) in gone {
            work.end(id, event)?;
        }
        work.scorings.retain(|scoring| {
            if scoring.events.is_closed() {
                self.metrics.cancelled.inc();
                false
            } else if now > scoring.deadline {
                self.metrics.timed_out.inc();
                let _ = scoring.events.send(Event::TimedOut);
                false
            } else {
                true
            }
        });
        Ok(())
    }

    /// Runs one chunk of the classification request at the front, which then goes to the back,
    /// so concurrent classifications share the thread and none holds decoding up for longer
    /// than a chunk.
    fn score_one_chunk(&self, model: &Model, work: &mut Active<'_>) {
        let Some(mut scoring) = work.scorings.pop_front() else {
            return;
        };
        let scored = rayon::scope(|_| scoring.plan.run_next_chunk(model));
        match scored {
            Ok(true) => {
                let _ = scoring.events.send(scoring.plan.into_event());
            }
            Ok(false) => work.scorings.push_back(scoring),
            Err(e) => {
                let message = format!("{e:#}");
                tracing::error!(error = %message, request = scoring.id, "scoring failed");
                let _ = scoring.events.send(Event::Failed(message));
            }
        }
    }

    /// One token boundary: let waiting rows join within the limits, fairly, then choose every
    /// row's next token.
    fn step(&self, work: &mut Active<'_>) -> Result<()> {
        let joining = self.joining(work);
        if self.panic_for_tests && !joining.is_empty() {
            panic!("{PANIC_FOR_TESTS} is set: the scheduler dies as a test asked");
        }
        if !joining.is_empty() {
            let prompt_tokens: usize = joining.iter().map(|(_, s)| s.prompt().len()).sum();
            self.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
            let jobs: Vec<u64> = joining.iter().map(|(tag, _)| tag.job).collect();
            match work.batch.join(joining) {
                Ok(finished) => {
                    for (tag, generated) in finished {
                        self.finish(work, tag, Ok(generated))?;
                    }
                }
                Err(e) => {
                    // Reading these prompts failed: their requests fail, the batch goes on.
                    let message = format!("{e:#}");
                    tracing::error!(error = %message, "reading prompts failed");
                    for &id in &jobs {
                        if let Some(generation) = work.generations.get_mut(&id) {
                            generation.in_batch -= 1;
                        }
                    }
                    for id in jobs {
                        if work.generations.contains_key(&id) {
                            work.end(id, Some(Event::Failed(message.clone())))?;
                        }
                    }
                }
            }
            self.metrics.batch_rows.set(work.batch.len() as i64);
        }
        if work.batch.is_empty() {
            return Ok(());
        }

        let started = Instant::now();
        let rows_before = work.batch.len();
        let generations = &work.generations;
        let finished = work.batch.advance(&mut |tag, token| {
            if let Some(generation) = generations.get(&tag.job) {
                let _ = generation.events.send(Event::Token {
                    instance: tag.instance,
                    token,
                });
            }
        })?;
        // Before any answer goes out, so that /metrics agrees with what a client has seen.
        self.metrics.batch_rows.set(work.batch.len() as i64);
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.generated_tokens.inc_by(rows_before as u64);
        self.metrics.decode_batch_rows.observe(rows_before as f64);
        if seconds > 0.0 {
            self.metrics
                .tokens_per_second
                .set(rows_before as f64 / seconds);
        }
        for (tag, generated) in finished {
            self.finish(work, tag, generated)?;
        }
        Ok(())
    }

    /// The rows that join the batch now: while a row, its positions and its prompt fit the
    /// limits, the next row of the admitted request with the fewest rows in the batch (the
    /// oldest among equals).
    fn joining(&self, work: &mut Active<'_>) -> Vec<(RowTag, Sequence)> {
        let mut joining = Vec::new();
        let mut rows = work.batch.len();
        let mut reserved = work.batch.reserved_positions();
        let mut prefill = 0;
        while rows < self.limits.max_batch {
            let Some((&id, generation)) = work
                .generations
                .iter_mut()
                .filter(|(_, g)| !g.waiting.is_empty())
                .min_by_key(|(&id, g)| (g.in_batch, id))
            else {
                break;
            };
            let (_, sequence) = generation.waiting.front().expect("has waiting rows");
            let size = sequence.max_positions();
            let prompt = sequence.prompt().len();
            let fits_positions = rows == 0 || reserved + size <= self.limits.max_batch_tokens;
            let fits_prefill =
                joining.is_empty() || prefill + prompt <= self.limits.max_prefill_tokens;
            if !(fits_positions && fits_prefill) {
                break;
            }
            let (instance, sequence) = generation.waiting.pop_front().expect("has waiting rows");
            generation.in_batch += 1;
            rows += 1;
            reserved += size;
            prefill += prompt;
            joining.push((RowTag { job: id, instance }, sequence));
        }
        joining
    }

    /// A row has finished: its answer goes to its request, or its error fails the request.
    fn finish(
        &self,
        work: &mut Active<'_>,
        tag: RowTag,
        generated: Result<Generated>,
    ) -> Result<()> {
        let Some(generation) = work.generations.get_mut(&tag.job) else {
            return Ok(());
        };
        generation.in_batch -= 1;
        match generated {
            Ok(generated) => {
                let _ = generation.events.send(Event::Done {
                    instance: tag.instance,
                    generated,
                });
                generation.unfinished -= 1;
                if generation.unfinished == 0 {
                    work.generations.remove(&tag.job);
                }
                Ok(())
            }
            Err(e) => {
                let message = format!("instance {}: {e:#}", tag.instance);
                tracing::error!(error = %message, request = tag.job, "generation failed");
                work.end(tag.job, Some(Event::Failed(message)))
            }
        }
    }
}
