//! The gRPC service: it checks requests and sends the engine its jobs.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::ahead::Post;
use super::{status, BoxStream, Engine, Job, Step, StepOut, StepOutcome, WorkerConfig};
use crate::description::ModelDescription;
use crate::device;
use crate::error::Result;
use crate::mlx;
use crate::prefix::PrefixStore;
use crate::proto::worker_server::{Worker, WorkerServer};
use crate::proto::{
    DeviceInfo, DeviceInfoRequest, EngineStats, FileChunk, ForwardMessage, ForwardReply,
    LoadProgress, LoadShardRequest, MlxMemory, ModelDescription as ProtoDescription, ModelSource,
    PushFileReply, ReleaseReply, ReleaseRequest, RingReply, RingToken, Traffic,
};
use crate::transport::CheckToken;
use crate::util::lock;

/// What a worker keeps per peer address, shared by all its streams.
#[derive(Default)]
pub(super) struct Peers {
    /// One channel per next-stage address, shared by every sequence's
    /// stream: a sequence's first step pays no connection (or TLS
    /// handshake).
    pub(super) channels: std::sync::Mutex<HashMap<String, crate::transport::Client>>,
    /// The last stage's streams to first stages (Ring), shared by every
    /// sequence.
    pub(super) rings: std::sync::Mutex<HashMap<String, mpsc::Sender<RingToken>>>,
}

/// The gRPC service.
#[derive(Clone)]
pub struct WorkerService {
    pub(super) cfg: Arc<WorkerConfig>,
    pub(super) jobs: std_mpsc::Sender<Job>,
    /// (bytes, messages) of Forward requests sent downstream.
    pub(super) sent: Arc<(AtomicU64, AtomicU64)>,
    started: Instant,
    /// On the first stage: the Forward stream of each sequence in a ring
    /// step, where the token coming round (Ring) goes.
    pub(super) rings: Arc<std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<RingToken>>>>,
    /// Set when the worker shuts down: incoming rings, which never end by
    /// themselves, end then so the server can stop.
    pub(super) stopping: Arc<tokio::sync::watch::Sender<bool>>,
    /// Tokens received round the ring.
    pub(super) ring_tokens: Arc<AtomicU64>,
    /// The engine's `job_since` and `last_info`: what GetDeviceInfo reports
    /// while the engine is too busy to answer.
    job_since: Arc<AtomicU64>,
    last_info: Arc<std::sync::Mutex<EngineStats>>,
    /// Where the input of the engine's step launched ahead is delivered.
    post: Arc<Post>,
    /// Channels to the next stage, and rings to first stages.
    pub(super) peers: Arc<Peers>,
}

/// How long GetDeviceInfo waits for the engine's own figures before giving
/// its last ones: a worker busy with a long step or load still answers
/// health probes, `/cluster/status` and re-planning at once.
const ENGINE_ANSWER: Duration = Duration::from_millis(500);

impl WorkerService {
    pub fn new(cfg: WorkerConfig) -> WorkerService {
        let (tx, rx) = std_mpsc::channel();
        let started = Instant::now();
        let job_since = Arc::new(AtomicU64::new(0));
        let last_info: Arc<std::sync::Mutex<EngineStats>> = Default::default();
        let post = Arc::new(Post::default());
        let engine = Engine {
            name: cfg.name.clone(),
            job_since: job_since.clone(),
            origin: started,
            last_info: last_info.clone(),
            max_sequences: cfg.max_sequences.max(1),
            stage: None,
            seqs: HashMap::new(),
            caches: Vec::new(),
            free: Vec::new(),
            later: Default::default(),
            busy: Duration::ZERO,
            tokens: 0,
            steps: 0,
            batches: 0,
            batched_steps: 0,
            prefixes: PrefixStore::default(),
            prefix_cache_bytes: cfg.prefix_cache_bytes,
            last_decode: Duration::ZERO,
            spin: cfg.spin,
            launch_ahead: cfg.launch_ahead,
            prepared: None,
            next_guess: None,
            mailboxes: None,
            post: post.clone(),
            launched_ahead: 0,
            launched_ahead_undone: 0,
        };
        std::thread::Builder::new()
            .name("mlx-dist-engine".into())
            .spawn(move || engine.run(rx))
            .expect("cannot start the engine thread");
        WorkerService {
            cfg: Arc::new(cfg),
            jobs: tx,
            sent: Arc::new((AtomicU64::new(0), AtomicU64::new(0))),
            started,
            rings: Default::default(),
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
            ring_tokens: Arc::new(AtomicU64::new(0)),
            job_since,
            last_info,
            post,
            peers: Default::default(),
        }
    }

    fn send(&self, job: Job) -> std::result::Result<(), Status> {
        let _sorted = self.post.sort(&job);
        self.jobs
            .send(job)
            .map_err(|_| Status::internal("the engine thread has stopped"))
    }

    pub(super) async fn step(&self, req: Step) -> StepOutcome {
        self.submit(req)?
            .await
            .map_err(|_| Status::internal("the engine thread has stopped"))?
            .map_err(status)
    }

    /// Queues a step on the engine now; its result comes on the receiver.
    pub(crate) fn submit(
        &self,
        req: Step,
    ) -> std::result::Result<oneshot::Receiver<Result<StepOut>>, Status> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Step(req, tx, Instant::now()))?;
        Ok(rx)
    }

    pub(crate) async fn release(&self, seq: String) -> u64 {
        let (tx, rx) = oneshot::channel();
        if self.send(Job::Release(seq, tx)).is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// The service behind the cluster-token check (open when no token is set).
    pub fn into_server(
        self,
    ) -> tonic::service::interceptor::InterceptedService<WorkerServer<WorkerService>, CheckToken>
    {
        let check = self.cfg.transport.check_token();
        let limit = self.cfg.max_message_bytes.max(1 << 20);
        let server = WorkerServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        tonic::service::interceptor::InterceptedService::new(server, check)
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn get_device_info(
        &self,
        request: Request<DeviceInfoRequest>,
    ) -> std::result::Result<Response<DeviceInfo>, Status> {
        let remeasure = request.into_inner().remeasure;
        let name = self.cfg.name.clone();
        let caps = tokio::task::spawn_blocking(move || {
            if remeasure {
                device::remeasure(&name)
            } else {
                device::capabilities(&name)
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)?;
        let (tx, rx) = oneshot::channel();
        self.send(Job::Info(tx))?;
        let (engine, busy_for) = match tokio::time::timeout(ENGINE_ANSWER, rx).await {
            Ok(answer) => (
                answer.map_err(|_| Status::internal("the engine thread has stopped"))?,
                0,
            ),
            // Busy: its figures after its last job, and for how long (the
            // question stays queued; its answer goes nowhere).
            Err(_) => {
                let since = self.job_since.load(Ordering::Relaxed);
                let now = self.started.elapsed().as_micros() as u64;
                let busy_for = if since == 0 {
                    0
                } else {
                    now.saturating_sub(since - 1).max(1)
                };
                (lock(&self.last_info).clone(), busy_for)
            }
        };
        Ok(Response::new(DeviceInfo {
            device: Some(caps.into()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            mlx_version: mlx::version(),
            engine: Some(engine),
            memory: Some(MlxMemory {
                active: mlx::active_memory() as u64,
                peak: mlx::peak_memory() as u64,
            }),
            traffic: Some(Traffic {
                forward_bytes_sent: self.sent.0.load(Ordering::Relaxed),
                forward_messages_sent: self.sent.1.load(Ordering::Relaxed),
                ring_tokens: self.ring_tokens.load(Ordering::Relaxed),
            }),
            uptime_micros: self.started.elapsed().as_micros() as u64,
            busy_for_micros: busy_for,
        }))
    }

    async fn describe_model(
        &self,
        request: Request<ModelSource>,
    ) -> std::result::Result<Response<ProtoDescription>, Status> {
        let path = request.into_inner().path;
        if path.is_empty() {
            return Err(Status::invalid_argument("DescribeModel needs a path"));
        }
        self.cfg.check_local_paths().map_err(status)?;
        let d = tokio::task::spawn_blocking(move || ModelDescription::of(&path))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        Ok(Response::new(
            ProtoDescription::try_from(&d).map_err(status)?,
        ))
    }

    async fn push_file(
        &self,
        request: Request<Streaming<FileChunk>>,
    ) -> std::result::Result<Response<PushFileReply>, Status> {
        self.receive_files(request).await
    }

    type LoadShardStream = BoxStream<LoadProgress>;

    async fn load_shard(
        &self,
        request: Request<LoadShardRequest>,
    ) -> std::result::Result<Response<Self::LoadShardStream>, Status> {
        let req = request.into_inner();
        if req.layer_end < req.layer_start {
            return Err(Status::invalid_argument("layer_end is before layer_start"));
        }
        let (tx, rx) = mpsc::channel(64);
        self.send(Job::Load(req, self.cfg.clone(), tx))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ForwardStream = BoxStream<ForwardReply>;

    async fn forward(
        &self,
        request: Request<Streaming<ForwardMessage>>,
    ) -> std::result::Result<Response<Self::ForwardStream>, Status> {
        self.relay(request).await
    }

    async fn ring(
        &self,
        request: Request<Streaming<RingToken>>,
    ) -> std::result::Result<Response<RingReply>, Status> {
        let mut tokens = request.into_inner();
        let mut stopping = self.stopping.subscribe();
        let mut n = 0;
        loop {
            let t = tokio::select! {
                t = tokens.message() => match t? {
                    Some(t) => t,
                    None => break,
                },
                _ = stopping.wait_for(|s| *s) => break,
            };
            n += 1;
            self.ring_tokens.fetch_add(1, Ordering::Relaxed);
            // A sequence that ended meanwhile drops its late token.
            if let Some(tx) = lock(&self.rings).get(&t.sequence_id) {
                let _ = tx.send(t);
            }
        }
        Ok(Response::new(RingReply { tokens: n }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> std::result::Result<Response<ReleaseReply>, Status> {
        let seq = request.into_inner().sequence_id;
        let freed = WorkerService::release(self, seq).await;
        Ok(Response::new(ReleaseReply { freed_bytes: freed }))
    }
}
