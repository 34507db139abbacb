//! The engine's worker thread: owns the model's compute, takes requests from async callers, and
//! interleaves the decode steps of concurrent requests so that none waits for another to finish.

use std::sync::Arc;
use std::sync::mpsc;

use tokio::sync::{mpsc as async_mpsc, oneshot};
use ttc_energy::{EnergyMeter, RequestTally};

use super::{
    Engine, EngineError, Generation, GenerationEvent, GenerationOutput, GenerationRequest,
    RequestJoules,
};

struct Job {
    request: GenerationRequest,
    events: Option<async_mpsc::UnboundedSender<GenerationEvent>>,
    done: oneshot::Sender<Result<GenerationOutput, EngineError>>,
}

/// A handle to the worker; cheap to clone. The worker stops when every handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    engine: Arc<Engine>,
    jobs: mpsc::Sender<Job>,
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
        std::thread::Builder::new()
            .name("ttc-engine".into())
            .spawn(move || run(&worker_engine, &meter, &inbox))?;
        Ok(Self { engine, jobs })
    }

    /// The engine, for tokenizing and metadata.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Queues a request.
    pub fn submit(&self, request: GenerationRequest, stream: bool) -> Submission {
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
                }),
                Err(e) => {
                    let _ = job.done.send(Err(e));
                }
            }
        }
        // Round robin: one forward pass per active request.
        let mut still = Vec::with_capacity(active.len());
        for mut a in active.drain(..) {
            let events = a.events.clone();
            let mut on_event = |event: GenerationEvent| match &events {
                Some(tx) => tx.send(event).is_ok(),
                None => true,
            };
            // Each forward pass is one metered batch; it holds one request's rows.
            let tokens = a.generation.next_pass_tokens() as u64;
            let batch = meter.begin_batch();
            let stepped = a.generation.step(engine, &mut on_event);
            for share in &batch.finish(&[((), tokens)]).requests {
                a.energy.add(share);
            }
            match stepped {
                Ok(false) => still.push(a),
                Ok(true) => {
                    let mut output = a.generation.finish();
                    // A batch priced by the estimate after a failed read taints the request's
                    // figure, so it is never shown as measured.
                    output.energy = a.energy.usage().map(|u| RequestJoules {
                        joules: u.joules,
                        source: u.source,
                    });
                    let _ = a.done.send(Ok(output));
                }
                Err(e) => {
                    tracing::error!(error = %e, "generation failed");
                    let _ = a.done.send(Err(e));
                }
            }
        }
        active = still;
    }
}
