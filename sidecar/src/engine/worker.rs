//! The engine's worker thread: owns the model's compute, takes requests from async callers, and
//! runs the decode steps of concurrent requests as one shared pass, so that none waits for
//! another to finish and together they cost little more than one (the weights stream once per
//! pass whatever the number of rows). A new request joins at the next step: its prefill runs on
//! its own, then it decodes with the others.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as async_mpsc, oneshot};
use ttc_energy::{EnergyMeter, RequestTally};

use crate::admission::{Admission, Permit};

use super::{
    Engine, EngineError, Generation, GenerationEvent, GenerationOutput, GenerationRequest, Next,
    RequestJoules, decode_together,
};

struct Job {
    request: GenerationRequest,
    events: Option<async_mpsc::UnboundedSender<GenerationEvent>>,
    done: oneshot::Sender<Result<GenerationOutput, EngineError>>,
    /// The room the request was admitted with, held until it finishes.
    permit: Option<Permit>,
}

tokio::task_local! {
    /// When the request being served must be answered by: a request waits for room no longer
    /// than this (the API sets it around each request).
    pub static DEADLINE: Instant;
}

/// A handle to the worker; cheap to clone. The worker stops when every handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    engine: Arc<Engine>,
    jobs: mpsc::Sender<Job>,
    running: Arc<AtomicBool>,
    /// What the engine takes on at once; `None`: everything it is given.
    admission: Option<Arc<Admission>>,
}

/// Clears its flag when dropped: when the thread that holds it ends, returning or panicking.
struct ClearOnExit(Arc<AtomicBool>);

impl Drop for ClearOnExit {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A submitted request: its event stream (when asked for) and its final result.
pub struct Submission {
    /// Text deltas and finish events, in order; `None` unless streaming was asked for.
    /// Dropping it cancels the request.
    pub events: Option<async_mpsc::UnboundedReceiver<GenerationEvent>>,
    /// The whole output once every sample has finished.
    pub done: oneshot::Receiver<Result<GenerationOutput, EngineError>>,
}

impl EngineHandle {
    /// Starts the worker thread for `engine`; every forward pass is metered by `meter`.
    pub fn spawn(engine: Engine, meter: EnergyMeter) -> std::io::Result<Self> {
        let engine = Arc::new(engine);
        let (jobs, inbox) = mpsc::channel();
        let worker_engine = Arc::clone(&engine);
        let running = Arc::new(AtomicBool::new(true));
        let guard = ClearOnExit(Arc::clone(&running));
        std::thread::Builder::new()
            .name("ttc-engine".into())
            .spawn(move || {
                let _guard = guard;
                run(&worker_engine, &meter, &inbox);
            })?;
        Ok(Self {
            engine,
            jobs,
            running,
            admission: None,
        })
    }

    /// This handle with admission control: every request waits for room in `admission` (a
    /// bounded wait) or is refused with [`EngineError::Overloaded`].
    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// The admission control, when there is one.
    pub fn admission(&self) -> Option<&Arc<Admission>> {
        self.admission.as_ref()
    }

    /// Room for `request`: waits in line up to the admission's wait, or the [`DEADLINE`] of
    /// the request being served when that is sooner.
    async fn admit(&self, request: &GenerationRequest) -> Result<Option<Permit>, EngineError> {
        let Some(admission) = &self.admission else {
            return Ok(None);
        };
        let demand = admission.demand(request.prompt.len(), request.n, request.max_tokens);
        let wait = DEADLINE
            .try_with(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(admission.config().max_wait);
        Ok(Some(admission.admit(demand, wait).await?))
    }

    /// Whether the worker thread still runs; false once it has ended (a panic in a forward
    /// pass), after which every request fails and the pod should be restarted (`/healthz`).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// The engine, for tokenizing and metadata.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Queues a request once it is admitted (see [`EngineHandle::with_admission`]).
    pub async fn submit(
        &self,
        request: GenerationRequest,
        stream: bool,
    ) -> Result<Submission, EngineError> {
        let permit = self.admit(&request).await?;
        Ok(self.queue(request, stream, permit))
    }

    fn queue(
        &self,
        request: GenerationRequest,
        stream: bool,
        permit: Option<Permit>,
    ) -> Submission {
        let (done_tx, done) = oneshot::channel();
        let (events_tx, events) = if stream {
            let (tx, rx) = async_mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let job = Job {
            request,
            events: events_tx,
            done: done_tx,
            permit,
        };
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            let _ = job.done.send(Err(EngineError::ShutDown));
        }
        Submission { events, done }
    }

    /// Runs a request to completion.
    pub async fn generate(
        &self,
        request: GenerationRequest,
    ) -> Result<GenerationOutput, EngineError> {
        self.submit(request, false)
            .await?
            .done
            .await
            .unwrap_or(Err(EngineError::ShutDown))
    }
}

struct Active {
    generation: Generation,
    energy: RequestTally,
    events: Option<async_mpsc::UnboundedSender<GenerationEvent>>,
    done: oneshot::Sender<Result<GenerationOutput, EngineError>>,
    /// Given back when the request finishes, fails or is cancelled (before its caller hears,
    /// so that a caller who sends the next request finds the room free).
    permit: Option<Permit>,
}

impl Active {
    /// Forwards events to the caller; false once the caller has gone (its stream dropped, or
    /// it stopped waiting for the result: a deadline passed), which cancels the request's rows.
    fn on_event(&self) -> impl FnMut(GenerationEvent) -> bool + use<> {
        let events = self.events.clone();
        let gone = self.done.is_closed();
        move |event| {
            !gone
                && match &events {
                    Some(tx) => tx.send(event).is_ok(),
                    None => true,
                }
        }
    }

    fn complete(mut self) {
        drop(self.permit.take());
        let mut output = self.generation.finish();
        // A batch priced by the estimate after a failed read taints the request's figure, so
        // it is never shown as measured.
        output.energy = self.energy.usage().map(|u| RequestJoules {
            joules: u.joules,
            source: u.source,
        });
        let _ = self.done.send(Ok(output));
    }

    fn fail(mut self, error: EngineError) {
        drop(self.permit.take());
        tracing::error!(error = %error, "generation failed");
        let _ = self.done.send(Err(error));
    }
}

/// A step (one turn of the loop: the requests' own passes, then the shared decode pass) slower
/// than this is logged: every request in the batch waits for it, and its clients see a stall.
const SLOW_STEP: Duration = Duration::from_secs(10);

/// Logs a step slower than [`SLOW_STEP`]: how long, for how many requests, the tokens of their
/// own passes (prefills and sampling) and the rows of the shared decode pass.
fn log_if_slow(started: Instant, requests: usize, own_pass_tokens: u64, decode_rows: u64) {
    let took = started.elapsed();
    if took > SLOW_STEP {
        tracing::warn!(
            seconds = took.as_secs_f64(),
            requests,
            own_pass_tokens,
            decode_rows,
            "an engine step was slow; every request in it waited"
        );
    }
}

fn run(engine: &Engine, meter: &EnergyMeter, inbox: &mpsc::Receiver<Job>) {
    let mut active: Vec<Active> = Vec::new();
    loop {
        let mut incoming = Vec::new();
        if active.is_empty() {
            match inbox.recv() {
                Ok(job) => incoming.push(job),
                Err(mpsc::RecvError) => return,
            }
        }
        incoming.extend(inbox.try_iter());
        for job in incoming {
            match Generation::new(engine, job.request) {
                Ok(generation) => active.push(Active {
                    generation,
                    energy: RequestTally::default(),
                    events: job.events,
                    done: job.done,
                    permit: job.permit,
                }),
                Err(e) => {
                    let _ = job.done.send(Err(e));
                }
            }
        }
        // Each request samples its rows (after its prompt's prefill, the first time): one
        // metered batch per request, since the work is its own.
        let step_started = Instant::now();
        let (requests, mut own_pass_tokens) = (active.len(), 0);
        let mut decoding = Vec::with_capacity(active.len());
        for mut a in active.drain(..) {
            let tokens = a.generation.next_pass_tokens().max(1) as u64;
            own_pass_tokens += tokens;
            let batch = meter.begin_batch();
            let sampled = a.generation.sample(engine, &mut a.on_event());
            for share in &batch.finish(&[((), tokens)]).requests {
                a.energy.add(share);
            }
            match sampled {
                Ok(Next::Decode(tokens)) => decoding.push((a, tokens)),
                Ok(Next::Done) => a.complete(),
                Err(e) => a.fail(e),
            }
        }
        if decoding.is_empty() {
            log_if_slow(step_started, requests, own_pass_tokens, 0);
            continue;
        }
        // Then one decode pass shared by every request that goes on: the weights stream once
        // for all their rows, and the pass's energy is split by rows.
        let rows: Vec<(usize, u64)> = decoding
            .iter()
            .enumerate()
            .map(|(i, (_, tokens))| (i, tokens.len() as u64))
            .collect();
        let batch = meter.begin_batch();
        let decoded = {
            let mut steps: Vec<(&mut Generation, Vec<u32>)> = decoding
                .iter_mut()
                .map(|(a, tokens)| (&mut a.generation, std::mem::take(tokens)))
                .collect();
            decode_together(engine, &mut steps)
        };
        for share in &batch.finish(&rows).requests {
            decoding[share.request_id].0.energy.add(share);
        }
        let decode_rows = rows.iter().map(|r| r.1).sum();
        log_if_slow(step_started, requests, own_pass_tokens, decode_rows);
        match decoded {
            Ok(()) => active.extend(decoding.into_iter().map(|(a, _)| a)),
            Err(e) => {
                let message = e.to_string();
                for (a, _) in decoding {
                    a.fail(EngineError::Compute(Box::new(candle_core::Error::Msg(
                        message.clone(),
                    ))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_flag_clears_when_its_thread_panics() {
        let running = Arc::new(AtomicBool::new(true));
        let guard = ClearOnExit(Arc::clone(&running));
        let thread = std::thread::spawn(move || {
            let _guard = guard;
            panic!("a forward pass panicked");
        });
        assert!(thread.join().is_err(), "the thread panicked");
        assert!(!running.load(Ordering::Acquire));
    }
}
