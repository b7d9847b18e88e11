//! The inference thread: batching loop, text cache, vision batch, per-image decoder chunks, filtering.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ort::memory::MemoryInfo;
use ort::session::{IoBinding, Session, SessionOutputs};
use ort::value::{Shape, Tensor, TensorRef, TensorRefMut};
use tokio::sync::watch;

use super::queue::{JobQueue, TakeError, drop_gone, is_gone as gone};
use super::text_cache::TextCache;
use super::{Health, Instance, Job, JobOutput};
use crate::error::Error;
use crate::mask_plane::MaskOutput;
use crate::model::fixed_io::{FixedVision, device_memory};
use crate::model::manifest::ImageInput;
use crate::model::runtime::{Provider, Sessions};
use crate::model::tokenizer::Tokens;
use crate::postprocess::FilterParams;
use crate::preprocess::Pixels;

#[path = "decode.rs"]
mod decode;
use decode::{Decoders, decode_chunk};
#[path = "decoder_choice.rs"]
mod decoder_choice;
#[path = "warmup.rs"]
mod warmup;

/// Everything the inference thread needs besides the sessions.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub image_size: usize,
    /// What the vision graph takes (bytes or normalised floats): the probe's zero image is made to fit.
    pub image_input: ImageInput,
    pub mask_size: usize,
    pub context: usize,
    pub feature_dim: usize,
    pub max_batch_images: usize,
    pub max_queue_delay: Duration,
    pub queue_capacity: usize,
    pub decoder_chunk: usize,
    /// Most phrases one request has (MAX_CONCEPTS): the warm-up runs no larger phrase count.
    pub max_concepts: usize,
    pub text_cache_entries: usize,
    /// Tokens of a phrase used for warm-up and health probes.
    pub probe_tokens: Tokens,
    /// While NOT_SERVING, how often to probe for recovery (None: never).
    pub reprobe_interval: Option<Duration>,
    /// Test-only fault injection, checked before every session run of the probe and of requests (not warm-up's).
    pub faults: super::Faults,
    /// The decoder returns its best K queries per phrase (0: all of them, dense outputs).
    pub decoder_topk: usize,
    /// The decoder's mask planes are float32 logits or uint8 probabilities.
    pub mask_output: MaskOutput,
    /// Stamped while a batch or a recovery probe runs (`Busy`).
    pub busy: super::Busy,
}

/// Replies to a job. Its span handle goes first: the request's span closes (and is exported) when its handler
/// ends, not whenever this thread gets round to dropping the job.
pub(super) fn answer(job: Job, result: Result<JobOutput, Error>) {
    let Job { reply, span, .. } = job;
    drop(span);
    let _ = reply.send(result);
}

/// How often an idle inference thread looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// One inference thread: stopped and joined when dropped (as TEI's `BackendThread`), so the sessions are released
/// before `run` returns, even while a request task still holds an `EngineHandle`. The join waits for at most the
/// batch in progress.
pub(super) struct InstanceThread {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl InstanceThread {
    /// Tells the thread to stop after its batch in progress, without waiting.
    pub(super) fn ask_to_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Tells the thread to stop and lets it go without waiting for it: for a thread whose run never returns
    /// (`exit`), which a join would wait on for ever. It ends on its own if the run ever does.
    pub(super) fn detach(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.join.take());
    }
}

impl Drop for InstanceThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(join) = self.join.take()
            && join.join().is_err()
        {
            tracing::error!("the inference thread panicked");
        }
    }
}

/// Starts one inference thread (`name`), on a queue of its own. It warms the sessions up first (health stays
/// WarmingUp until then) and stops when every handle has been dropped or the `InstanceThread` is.
pub(super) fn spawn_instance(
    name: String,
    sessions: Sessions,
    settings: EngineSettings,
) -> std::io::Result<(Instance, InstanceThread)> {
    let queue = JobQueue::new(settings.queue_capacity);
    let (health_tx, health_rx) = watch::channel(Health::WarmingUp);
    let handle = Instance {
        queue: queue.clone(),
        health: health_rx,
        busy: settings.busy.clone(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let join = std::thread::Builder::new().name(name).spawn(move || {
        // Dropped after `worker` (declared before it), on a return and on a panic alike. It borrows the queue:
        // `JobQueue::take` tells that every handle is gone by this thread's reference being the only one.
        let _closed_on_exit = CloseOnExit(&queue);
        let mut worker = Worker {
            cache: TextCache::new(settings.text_cache_entries),
            sessions,
            settings,
            health: health_tx,
            stop: stopping,
        };
        worker.run(&queue);
    })?;
    Ok((
        handle,
        InstanceThread {
            stop,
            join: Some(join),
        },
    ))
}

struct Worker {
    sessions: Sessions,
    settings: EngineSettings,
    cache: TextCache,
    health: watch::Sender<Health>,
    stop: Arc<AtomicBool>,
}

const PANICKED: &str =
    "the inference thread stopped on a panic (see the log); restart the segmenter";

/// A panic ends the inference thread: say so in its health (NOT_SERVING with the reason; a liveness probe restarts
/// the process) rather than leave the last state standing, WarmingUp or Serving, with nothing behind it.
impl Drop for Worker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.health.send_replace(Health::Broken(PANICKED.into()));
        }
    }
}

/// The inference thread's end closes its queue: the requests waiting in it, and any a handler submits in the moment
/// between its health check and this, are answered UNAVAILABLE now instead of at their deadlines.
struct CloseOnExit<'a>(&'a JobQueue);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        let why = if std::thread::panicking() {
            PANICKED
        } else {
            super::SHUTTING_DOWN
        };
        self.0.close(why);
    }
}

/// The jobs of a run that failed which were not answered (all of them, or those after the image whose decoder run
/// failed, that one included), with the error.
struct Unanswered {
    jobs: Vec<Job>,
    error: ort::Error,
}

impl Worker {
    fn run(&mut self, queue: &Arc<JobQueue>) {
        let started = Instant::now();
        // Recovery probes are for a provider that failed after serving. A failed warm-up is final (Broken: never
        // probed): it ran every shape, and one 1-image x 1-phrase probe passing later would not show that the
        // others work; health stays NOT_SERVING until the server exits (EXIT_AFTER_FAILURE_SEC) or a liveness probe
        // restarts the pod.
        let reprobe_interval = self.settings.reprobe_interval;
        match self.warm_up() {
            // Asked to stop while warming up (at full size on a CPU that is minutes): stop now, never SERVING.
            Ok(()) if self.stop.load(Ordering::SeqCst) => {
                tracing::info!("shutdown during warm-up: not serving");
            }
            Ok(()) => {
                tracing::info!(provider = %self.sessions.provider, warmup_ms = started.elapsed().as_millis() as u64, "model warm, serving");
                self.health.send_replace(Health::Serving);
            }
            Err(e) => {
                tracing::error!(error = %e, "warm-up failed; the segmenter will not serve");
                self.health
                    .send_replace(Health::Broken(format!("warm-up failed: {e}")));
            }
        }
        // Idle since the last batch or probe: a failed engine probes again after `reprobe_interval` of it.
        let mut idle_since = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            let first = match queue.take(STOP_POLL) {
                Ok(job) => job,
                Err(TakeError::Timeout) => {
                    // Refused requests never reach this queue while NOT_SERVING: probe when idle instead.
                    if let Some(every) = reprobe_interval
                        && self.is_failed()
                        && idle_since.elapsed() >= every
                    {
                        self.reprobe();
                        idle_since = Instant::now();
                    }
                    continue;
                }
                Err(TakeError::Disconnected) => break,
            };
            let mut batch = vec![first];
            let until = Instant::now() + self.settings.max_queue_delay;
            while batch.len() < self.settings.max_batch_images {
                let left = until.saturating_duration_since(Instant::now());
                match queue.take(left) {
                    Ok(job) => batch.push(job),
                    Err(TakeError::Timeout | TakeError::Disconnected) => break,
                }
            }
            self.process(batch);
            idle_since = Instant::now();
        }
        self.sessions.end_profiling();
        self.health.send_replace(Health::Stopped);
        tracing::info!("inference thread stopped");
    }

    fn is_failed(&self) -> bool {
        matches!(*self.health.borrow(), Health::Failed(_))
    }

    /// A recovery probe while NOT_SERVING: a transient provider fault (memory taken by a co-tenant, a driver hiccup)
    /// should not need a restart; a fault that persists keeps failing here and the liveness probe restarts the pod.
    fn reprobe(&mut self) {
        let busy = self.settings.busy.clone();
        let _running = busy.running();
        match self.probe() {
            Ok(()) => {
                tracing::warn!("health probe passed again: SERVING");
                metrics::counter!("segmenter_recoveries_total").increment(1);
                self.health.send_replace(Health::Serving);
            }
            Err(e) => tracing::warn!(error = %e, "recovery probe failed: still NOT_SERVING"),
        }
    }

    /// Runs a batch. After a run error a probe decides whether the provider itself is broken, before the batch is
    /// answered: then its requests get UNAVAILABLE (a client retries them on another replica) and health turns
    /// NOT_SERVING. Otherwise each request runs once more on its own: a fault that passed (device memory a
    /// co-tenant held for a moment) costs no request, a request that fails again alone is answered INTERNAL, and its
    /// batch-mates are answered as if it had not been there. (INTERNAL is not retried by clients: answering it for a
    /// whole batch after one transient fault failed every image in it for good.)
    fn process(&mut self, batch: Vec<Job>) {
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        for job in batch {
            if gone(&job) {
                drop_gone(job);
            } else {
                live.push(job);
            }
        }
        if live.is_empty() {
            return;
        }
        let busy = self.settings.busy.clone();
        let _running = busy.running();
        metrics::histogram!("segmenter_vision_batch_size").record(live.len() as f64);
        let Err(Unanswered { jobs, error }) = self.compute(live, now) else {
            return;
        };
        tracing::error!(error = %error, images = jobs.len(), "inference run failed");
        match self.probe() {
            Ok(()) => {
                for job in jobs {
                    if self.is_failed() {
                        answer(job, Err(self.not_serving()));
                    } else {
                        self.rerun_alone(job);
                    }
                }
            }
            Err(probe) => {
                tracing::error!(error = %probe, "health probe failed after a run error: NOT_SERVING");
                let reason = format!("execution provider failed: {probe}");
                self.health.send_replace(Health::Failed(reason.clone()));
                for job in jobs {
                    answer(job, Err(Error::NotServing(reason.clone())));
                }
            }
        }
    }

    /// A request of a batch whose run failed while the provider works, run once more by itself.
    fn rerun_alone(&mut self, job: Job) {
        if gone(&job) {
            drop_gone(job);
            return;
        }
        if let Err(Unanswered { jobs, error }) = self.compute(vec![job], Instant::now()) {
            tracing::error!(error = %error, "inference run failed again for the request alone");
            // The provider may have broken since the probe that let this run: then it is not the request's fault
            // (UNAVAILABLE, retried elsewhere) and health goes NOT_SERVING, as after any failed probe.
            if let Err(probe) = self.probe() {
                tracing::error!(error = %probe, "health probe failed after a rerun: NOT_SERVING");
                self.health.send_replace(Health::Failed(format!(
                    "execution provider failed: {probe}"
                )));
            }
            for job in jobs {
                let error = if self.is_failed() {
                    self.not_serving()
                } else {
                    Error::Inference(error.to_string())
                };
                answer(job, Err(error));
            }
        }
    }

    /// The answer while health is Failed: its reason.
    fn not_serving(&self) -> Error {
        match &*self.health.borrow() {
            Health::Failed(reason) | Health::Broken(reason) => Error::NotServing(reason.clone()),
            _ => Error::NotServing("execution provider failed".into()),
        }
    }

    /// A one-image, one-phrase pass through all three graphs. Used for warm-up and to tell a bad request from a
    /// broken execution provider.
    fn probe(&mut self) -> ort::Result<()> {
        let s = self.settings.image_size;
        let pixels = zero_images(self.settings.image_input, 1, s);
        let tokens = self.settings.probe_tokens.clone();
        let features = self.encode_text(std::slice::from_ref(&tokens))?;
        let params = FilterParams {
            threshold: 1.0,
            max_instances: 0,
            keep_semantic: false,
        };
        let Sessions {
            vision,
            decoder,
            decoder_outputs,
            decoder_static,
            fixed_vision,
            provider,
            ..
        } = &mut self.sessions;
        let faults = &self.settings.faults;
        faults.check("vision")?;
        let binding = bind_vision(vision, pixels, 1, s, provider, fixed_vision.as_mut())?;
        let vision_out = vision.run_binding(&binding)?;
        binding.synchronize_outputs()?;
        let fpn = fpn_views(&vision_out)?;
        faults.check("decoder")?;
        decode_chunk(
            Decoders {
                dynamic: decoder,
                dynamic_outputs: decoder_outputs.as_mut(),
                statics: decoder_static,
            },
            &self.settings,
            &fpn,
            0,
            &[features[0].clone()],
            &[tokens],
            (1, 1),
            params,
        )?;
        Ok(())
    }

    /// Runs the batch and answers each job as soon as its decoder runs are done (a job whose client left or whose
    /// deadline passed before then is dropped: checked before each chunk, as on the CPU one phrase's decoder run
    /// takes seconds). An image's answer does not wait for its batch-mates' decoder runs (on the CPU those take
    /// minutes for a preset's concepts: a request's deadline passed with its result ready). A run error comes back
    /// with the jobs not answered yet: all of them, or the image whose decoder run failed and those after it.
    fn compute(&mut self, jobs: Vec<Job>, start: Instant) -> Result<(), Unanswered> {
        // Text and vision run once for the whole batch: one span that follows from every request in it.
        let batch = tracing::info_span!(parent: None, "inference_batch", images = jobs.len());
        for job in &jobs {
            batch.follows_from(&job.span);
        }
        let batch = batch.entered();
        // Text: every phrase of the batch that is not cached goes through the encoder, 32 to a run. Each distinct
        // phrase is looked up (and counted in segmenter_text_cache_total) once per batch, however many of its
        // requests ask for it.
        let t0 = Instant::now();
        let mut hits: Vec<Vec<bool>> = Vec::with_capacity(jobs.len());
        let mut missing: Vec<(String, Tokens)> = Vec::new();
        let mut looked_up: HashMap<&str, bool> = HashMap::new();
        for job in &jobs {
            let mut job_hits = Vec::with_capacity(job.phrases.len());
            for (phrase, tokens) in &job.phrases {
                let hit = *looked_up.entry(phrase).or_insert_with(|| {
                    let hit = self.cache.get(phrase).is_some();
                    if !hit {
                        missing.push((phrase.clone(), tokens.clone()));
                    }
                    hit
                });
                job_hits.push(hit);
            }
            hits.push(job_hits);
        }
        for chunk in missing.chunks(TEXT_RUN_MAX) {
            let tokens: Vec<Tokens> = chunk.iter().map(|(_, t)| t.clone()).collect();
            let features = match self.encode_text(&tokens) {
                Ok(features) => features,
                // Every job given back unanswered.
                Err(error) => return Err(Unanswered { jobs, error }),
            };
            for ((phrase, _), f) in chunk.iter().zip(features) {
                self.cache.insert(phrase.clone(), f);
            }
        }
        let text = t0.elapsed();

        // Vision: one run for the whole batch. Its outputs are bound to the execution provider's device and the
        // decoder reads each image's slice there: the FPN levels (about 110 MB per image at full size) are neither
        // copied on the host nor, with CUDA, sent across PCIe and back.
        let t1 = Instant::now();
        let s = self.settings.image_size;
        let Worker {
            sessions,
            settings,
            cache,
            stop,
            ..
        } = self;
        // A failed step gives every job back unanswered.
        macro_rules! or_unanswered {
            ($step:expr) => {
                match $step {
                    Ok(done) => done,
                    Err(error) => return Err(Unanswered { jobs, error }),
                }
            };
        }
        let pixels = or_unanswered!(
            Pixels::concat(jobs.iter().map(|job| &job.pixels))
                .ok_or_else(|| ort::Error::new("a vision batch mixed u8 and f32 images"))
        );
        or_unanswered!(settings.faults.check("vision"));
        let binding = or_unanswered!(bind_vision(
            &sessions.vision,
            pixels,
            jobs.len(),
            s,
            &sessions.provider,
            sessions.fixed_vision.as_mut(),
        ));
        let vision_out = or_unanswered!(sessions.vision.run_binding(&binding));
        or_unanswered!(binding.synchronize_outputs());
        let fpn = or_unanswered!(fpn_views(&vision_out));
        let vision = t1.elapsed();
        metrics::histogram!("segmenter_stage_seconds", "stage" => "vision")
            .record(vision.as_secs_f64());
        metrics::histogram!("segmenter_stage_seconds", "stage" => "text")
            .record(text.as_secs_f64());

        drop(batch);
        // Decoder: per image, its phrases in chunks, inside the request's span; each image answered when done.
        let batch_size = jobs.len();
        let mut pending = jobs.into_iter().zip(hits).enumerate();
        while let Some((index, (job, job_hits))) = pending.next() {
            let span =
                tracing::info_span!(parent: &job.span, "decode", phrases = job.phrases.len())
                    .entered();
            let t2 = Instant::now();
            let features: Vec<Arc<[f32]>> = job
                .phrases
                .iter()
                .map(|(phrase, _)| cache.peek(phrase).expect("just encoded"))
                .collect();
            let tokens: Vec<Tokens> = job.phrases.iter().map(|(_, t)| t.clone()).collect();
            let mut concepts = Vec::with_capacity(tokens.len());
            let mut filter_time = Duration::ZERO;
            let chunk = settings.decoder_chunk.max(1);
            let (mut left, mut stopping) = (false, false);
            let mut run_chunks = || -> ort::Result<()> {
                for (f, t) in features.chunks(chunk).zip(tokens.chunks(chunk)) {
                    if gone(&job) {
                        left = true;
                        return Ok(());
                    }
                    if stop.load(Ordering::SeqCst) {
                        stopping = true;
                        return Ok(());
                    }
                    settings.faults.check("decoder")?;
                    let (kept, spent) = decode_chunk(
                        Decoders {
                            dynamic: &mut sessions.decoder,
                            dynamic_outputs: sessions.decoder_outputs.as_mut(),
                            statics: &mut sessions.decoder_static,
                        },
                        settings,
                        &fpn,
                        index,
                        f,
                        t,
                        job.image_size,
                        job.filter,
                    )?;
                    concepts.extend(kept);
                    filter_time += spent;
                }
                Ok(())
            };
            if let Err(error) = run_chunks() {
                drop(span);
                let jobs = std::iter::once(job)
                    .chain(pending.map(|(_, (job, _))| job))
                    .collect();
                return Err(Unanswered { jobs, error });
            }
            drop(span);
            if left {
                drop_gone(job);
                continue;
            }
            if stopping {
                // The shutdown's grace period is over (the thread is asked to stop only then): the batch ends here,
                // between decoder runs, instead of running on for minutes on the CPU past SHUTDOWN_GRACE_SEC.
                let reason = "the segmenter shut down before the request was computed";
                for job in std::iter::once(job).chain(pending.map(|(_, (job, _))| job)) {
                    answer(job, Err(Error::NotServing(reason.into())));
                }
                return Ok(());
            }
            let decoder = t2.elapsed().saturating_sub(filter_time);
            metrics::histogram!("segmenter_stage_seconds", "stage" => "decoder")
                .record(decoder.as_secs_f64());
            let output = JobOutput {
                concepts,
                cache_hits: job_hits,
                queue: start.saturating_duration_since(job.enqueued),
                text,
                vision,
                decoder,
                filter: filter_time,
                vision_batch: batch_size,
            };
            answer(job, Ok(output));
        }
        Ok(())
    }

    fn encode_text(&mut self, tokens: &[Tokens]) -> ort::Result<Vec<Arc<[f32]>>> {
        self.settings.faults.check("text")?;
        self.run_text(tokens)
    }

    /// The text encoder on `tokens`, without the fault checks a request's runs go through (the warm-up's runs are
    /// neither checked nor counted: engine/faults.rs).
    pub(super) fn run_text(&mut self, tokens: &[Tokens]) -> ort::Result<Vec<Arc<[f32]>>> {
        let n = tokens.len();
        let l = self.settings.context;
        let ids: Vec<i64> = tokens.iter().flat_map(|t| t.ids.iter().copied()).collect();
        let mask: Vec<i64> = tokens.iter().flat_map(|t| t.mask.iter().copied()).collect();
        let outputs = self.sessions.text.run(ort::inputs![
            "input_ids" => TensorRef::from_array_view(([n, l], &ids[..]))?,
            "attention_mask" => TensorRef::from_array_view(([n, l], &mask[..]))?,
        ])?;
        let (_, data) = outputs["text_features"].try_extract_tensor::<f32>()?;
        let per = data.len() / n.max(1);
        Ok(data.chunks_exact(per).map(Arc::from).collect())
    }
}

/// The most phrases one text-encoder run takes: a batch's new phrases run together, this many at a time.
pub(super) const TEXT_RUN_MAX: usize = 32;

/// `count` black images of side `size`, as the vision graph takes them (warm-up and probes).
pub(super) fn zero_images(input: ImageInput, count: usize, size: usize) -> Pixels {
    match input {
        ImageInput::U8Hwc => Pixels::U8Hwc(vec![0; count * 3 * size * size]),
        ImageInput::F32Chw => Pixels::F32Chw(vec![0.0; count * 3 * size * size]),
    }
}

/// Binds a vision run: the batch's pixels in (moved, not copied; copied into the fixed input tensor of a captured
/// vision session), the three FPN levels out to the provider's device: into the fixed tensors the captured sessions
/// use (fixed I/O, one image), else wherever ONNX Runtime puts them.
fn bind_vision(
    vision: &Session,
    pixels: Pixels,
    count: usize,
    size: usize,
    provider: &Provider,
    fixed: Option<&mut FixedVision>,
) -> ort::Result<IoBinding> {
    let mut binding = vision.create_binding()?;
    if let Some(fixed) = fixed.filter(|_| count == 1) {
        match pixels {
            Pixels::U8Hwc(bytes) => fixed.bind(
                &mut binding,
                ImageInput::U8Hwc.tensor_name(),
                [1, size, size, 3],
                bytes,
            )?,
            Pixels::F32Chw(floats) => fixed.bind(
                &mut binding,
                ImageInput::F32Chw.tensor_name(),
                [1, 3, size, size],
                floats,
            )?,
        }
        return Ok(binding);
    }
    match pixels {
        Pixels::U8Hwc(bytes) => binding.bind_input(
            ImageInput::U8Hwc.tensor_name(),
            &Tensor::from_array(([count, size, size, 3], bytes))?,
        )?,
        Pixels::F32Chw(floats) => binding.bind_input(
            ImageInput::F32Chw.tensor_name(),
            &Tensor::from_array(([count, 3, size, size], floats))?,
        )?,
    }
    let memory = device_memory(provider)?;
    for name in ["fpn_0", "fpn_1", "fpn_2"] {
        binding.bind_output_to_device(name, &memory)?;
    }
    Ok(binding)
}

/// The three FPN levels of a vision batch, where the run left them (host or device memory).
fn fpn_views<'a>(outputs: &'a SessionOutputs<'_>) -> ort::Result<Vec<FpnLevel<'a>>> {
    ["fpn_0", "fpn_1", "fpn_2"]
        .into_iter()
        .map(|name| {
            let tensor = outputs[name]
                .view()
                .downcast::<ort::value::DynTensorValueType>()?;
            let shape = tensor.shape();
            if shape.len() != 4 || tensor.data_type() != &ort::value::TensorElementType::Float32 {
                return Err(ort::Error::new(format!(
                    "vision output {name}: expected f32 [B, C, H, W], got {:?} {shape:?}",
                    tensor.data_type()
                )));
            }
            Ok(FpnLevel {
                batch: shape[0] as usize,
                per_image: shape.iter().skip(1).map(|&d| d as usize).collect(),
                data: tensor.data_ptr().cast::<f32>(),
                memory: tensor.memory_info().to_owned(),
                outputs: std::marker::PhantomData,
            })
        })
        .collect()
}

/// One FPN level of a vision batch: a tensor in the vision run's output buffer, possibly in device memory.
struct FpnLevel<'a> {
    batch: usize,
    /// [C, H, W] of one image.
    per_image: Vec<usize>,
    data: *const f32,
    memory: MemoryInfo<'static>,
    /// Borrows the run's outputs, which own `data`.
    outputs: std::marker::PhantomData<&'a SessionOutputs<'a>>,
}

impl<'a> FpnLevel<'a> {
    /// One image's level as a [1, C, H, W] tensor viewing the batch output in place (same device, no copy).
    #[allow(unsafe_code)] // the one place that needs it: ort has no safe sub-tensor view of device memory
    fn image(&self, index: usize) -> ort::Result<TensorRefMut<'a, f32>> {
        assert!(
            index < self.batch,
            "image {index} of a batch of {}",
            self.batch
        );
        let per: usize = self.per_image.iter().product();
        let shape = Shape::new(std::iter::once(1).chain(self.per_image.iter().map(|&d| d as i64)));
        // SAFETY: `data` is the start of a [batch, C, H, W] f32 tensor owned by the vision run's outputs, which
        // outlive 'a; image `index` < batch occupies the `per` elements from `index * per`. Pointer arithmetic
        // is valid for device addresses too (nothing is dereferenced here), and the view is only read.
        unsafe {
            TensorRefMut::from_raw(
                self.memory.clone(),
                self.data.add(index * per).cast_mut().cast(),
                shape,
            )
        }
    }
}

impl Provider {
    pub fn default_decoder_chunk(&self) -> usize {
        match self {
            Provider::Cuda(_) => 8,
            Provider::Cpu => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_holds_one_reference_to_its_queue_so_dropped_handles_end_it() {
        let queue = JobQueue::new(1);
        let handle = queue.clone();
        {
            // As in `spawn`'s thread: the queue, and the guard that closes it on the way out.
            let _closed_on_exit = CloseOnExit(&queue);
            drop(handle);
            assert!(
                matches!(
                    queue.take(Duration::from_millis(1)),
                    Err(TakeError::Disconnected)
                ),
                "every handle gone: the thread's take must say so (the guard's reference kept it waiting)"
            );
        }
        assert_eq!(Arc::strong_count(&queue), 1, "the guard took no reference");
    }
}
