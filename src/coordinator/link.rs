//! How the coordinator reaches one worker: over gRPC, or, for the worker
//! inside this process (`worker::start_local`), by handing its service the
//! steps directly. A server on one device runs there, so that concurrent
//! sequences still decode as one batch and keep the worker's prefix cache,
//! while no step pays protobuf, HTTP/2 or a loopback socket.
use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming};

use crate::error::Result;
use crate::proto::forward_message::Message;
use crate::proto::worker_server::Worker;
use crate::proto::{
    DeviceInfo, DeviceInfoRequest, ForwardMessage, ForwardReply, ForwardRequest, LoadProgress,
    LoadShardRequest, ReleaseRequest, RingCredit,
};
use crate::transport::{connect, Client, TransportConfig};
use crate::worker::{StepOut, WorkerService};

/// A worker, as the coordinator calls it.
#[derive(Clone)]
pub enum Link {
    Grpc(Client),
    InProcess(WorkerService),
}

type Progress = Pin<Box<dyn Stream<Item = std::result::Result<LoadProgress, Status>> + Send>>;

impl Link {
    /// The worker at `address`: the one inside this process by that name,
    /// else a gRPC connection within `timeout`, made as `transport` says.
    pub async fn open(
        address: &str,
        timeout: Duration,
        transport: &TransportConfig,
    ) -> Result<Link> {
        match crate::worker::in_process(address) {
            Some(svc) => Ok(Link::InProcess(svc)),
            None => Ok(Link::Grpc(connect(address, timeout, transport).await?)),
        }
    }

    /// The gRPC client, for the calls only a remote worker needs (pushing
    /// model files).
    pub fn client(&mut self) -> Option<&mut Client> {
        match self {
            Link::Grpc(c) => Some(c),
            Link::InProcess(_) => None,
        }
    }

    pub async fn device_info(&mut self) -> std::result::Result<DeviceInfo, Status> {
        let req = DeviceInfoRequest::default();
        match self {
            Link::Grpc(c) => Ok(c.get_device_info(req).await?.into_inner()),
            Link::InProcess(s) => Ok(s.get_device_info(Request::new(req)).await?.into_inner()),
        }
    }

    pub async fn load_shard(
        &mut self,
        req: LoadShardRequest,
    ) -> std::result::Result<Progress, Status> {
        match self {
            Link::Grpc(c) => Ok(Box::pin(c.load_shard(req).await?.into_inner())),
            Link::InProcess(s) => Ok(s.load_shard(Request::new(req)).await?.into_inner()),
        }
    }

    /// Opens one sequence's stream of steps.
    pub(crate) async fn forward(&self) -> std::result::Result<Steps, Status> {
        match self {
            Link::Grpc(c) => {
                let (tx, rx) = mpsc::channel(4);
                let replies = c.clone().forward(ReceiverStream::new(rx)).await?;
                Ok(Steps::Grpc {
                    tx,
                    replies: replies.into_inner(),
                })
            }
            Link::InProcess(s) => Ok(Steps::InProcess {
                svc: s.clone(),
                waiting: VecDeque::new(),
                seq: None,
            }),
        }
    }

    /// Frees a sequence's cache on the worker (and, over gRPC, the stages
    /// after it), waiting `within` at most.
    pub async fn release(&self, seq: String, within: Duration) {
        match self {
            Link::Grpc(c) => {
                let req = ReleaseRequest { sequence_id: seq };
                let _ = tokio::time::timeout(within, c.clone().release(req)).await;
            }
            Link::InProcess(s) => {
                s.release(seq).await;
            }
        }
    }

    pub fn in_process(&self) -> bool {
        matches!(self, Link::InProcess(_))
    }
}

/// One sequence's steps and their replies, in order.
pub(crate) enum Steps {
    Grpc {
        tx: mpsc::Sender<ForwardMessage>,
        replies: Streaming<ForwardReply>,
    },
    /// Each step is queued on the engine at once (so that the steps of
    /// concurrent sequences meet in one batch); its outcome is read in turn.
    InProcess {
        svc: WorkerService,
        waiting: VecDeque<std::result::Result<oneshot::Receiver<Result<StepOut>>, Status>>,
        /// The sequence, released when the steps end.
        seq: Option<String>,
    },
}

impl Steps {
    /// Sends one step; false when the stream is broken (the next reply
    /// says why).
    pub async fn send(&mut self, req: ForwardRequest) -> bool {
        match self {
            Steps::Grpc { tx, .. } => {
                let m = ForwardMessage {
                    message: Some(Message::Step(req)),
                };
                tx.send(m).await.is_ok()
            }
            Steps::InProcess { svc, waiting, seq } => {
                seq.get_or_insert_with(|| req.sequence_id.clone());
                waiting.push_back(svc.submit(req));
                true
            }
        }
    }

    /// Lets the first stage start `steps` more ring steps of `seq`; false
    /// when the stream is broken. (A stage in this process runs no ring.)
    pub async fn send_credit(&mut self, seq: &str, steps: u32) -> bool {
        match self {
            Steps::Grpc { tx, .. } => {
                let credit = RingCredit {
                    sequence_id: seq.to_string(),
                    steps,
                };
                let m = ForwardMessage {
                    message: Some(Message::Credit(credit)),
                };
                tx.send(m).await.is_ok()
            }
            Steps::InProcess { .. } => true,
        }
    }

    /// The next reply; `None` when the stream ended. Cancel-safe: a wait
    /// given up loses nothing.
    pub async fn message(&mut self) -> std::result::Result<Option<ForwardReply>, Status> {
        match self {
            Steps::Grpc { replies, .. } => replies.message().await,
            Steps::InProcess { waiting, seq, .. } => {
                let Some(next) = waiting.front_mut() else {
                    // Nothing asked: nothing will come.
                    return futures::future::pending().await;
                };
                let out = match next {
                    Ok(rx) => rx
                        .await
                        .map_err(|_| Status::internal("the engine thread has stopped")),
                    Err(e) => Err(e.clone()),
                };
                waiting.pop_front();
                let out = out?.map_err(crate::worker::status)?;
                if out.hidden.is_some() {
                    return Err(Status::failed_precondition(
                        "the worker in this process holds part of the model only",
                    ));
                }
                Ok(Some(ForwardReply {
                    sequence_id: seq.clone().unwrap_or_default(),
                    token: out.token,
                    logprobs: out.logprobs,
                    stage_micros: vec![out.micros],
                }))
            }
        }
    }

    /// Ends the stream. Over gRPC the worker releases the sequence when its
    /// stream closes; in this process the release is queued here, behind
    /// its steps and before any later sequence's.
    pub fn close(&mut self) {
        match self {
            Steps::Grpc { tx, .. } => *tx = mpsc::channel(1).0,
            Steps::InProcess { svc, seq, waiting } => {
                waiting.clear();
                if let Some(seq) = seq.take() {
                    svc.release_soon(seq);
                }
            }
        }
    }
}

/// Reads load progress until the load is done.
pub async fn finish_loading(
    mut progress: Progress,
    mut each: impl FnMut(&LoadProgress),
) -> std::result::Result<(), Status> {
    while let Some(p) = progress.next().await {
        let p = p?;
        each(&p);
        if p.done {
            return Ok(());
        }
    }
    Err(Status::internal("loading ended without finishing"))
}
