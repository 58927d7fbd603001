//! How the coordinator reaches one worker: over gRPC, or, for the worker
//! inside this process (`worker::start_local`), by handing its service the
//! steps directly. A server on one device runs there, so that concurrent
//! sequences still decode as one batch and keep the worker's prefix cache,
//! while no step pays protobuf, HTTP/2 or a loopback socket.
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use crate::error::Result;
use crate::proto::forward_message::Message;
use crate::proto::worker_server::Worker;
use crate::proto::{
    DeviceInfo, DeviceInfoRequest, ForwardMessage, ForwardReply, ForwardRequest, LoadProgress,
    LoadShardRequest, ModelDescription as ProtoDescription, ModelSource, ReleaseRequest,
    RingCredit,
};
use crate::transport::{connect, Client, TransportConfig};
use crate::worker::WorkerService;

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

    /// What the worker knows of the model at `path` (its path or repo id),
    /// read from its own files.
    pub async fn describe_model(
        &mut self,
        path: &str,
    ) -> std::result::Result<ProtoDescription, Status> {
        let req = ModelSource {
            path: path.to_string(),
            model_id: String::new(),
        };
        match self {
            Link::Grpc(c) => Ok(c.describe_model(req).await?.into_inner()),
            Link::InProcess(s) => Ok(s.describe_model(Request::new(req)).await?.into_inner()),
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

    /// Opens one sequence's stream of steps. The worker in this process
    /// relays them exactly as a Forward call's, without encoding them.
    pub(crate) async fn forward(&self) -> std::result::Result<Steps, Status> {
        let (tx, rx) = mpsc::channel(4);
        let replies: Replies = match self {
            Link::Grpc(c) => Box::pin(
                c.clone()
                    .forward(ReceiverStream::new(rx))
                    .await?
                    .into_inner(),
            ),
            Link::InProcess(s) => Box::pin(s.relay_stream(ReceiverStream::new(rx).map(Ok))),
        };
        Ok(Steps { tx, replies })
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

type Replies = Pin<Box<dyn Stream<Item = std::result::Result<ForwardReply, Status>> + Send + Sync>>;

/// One sequence's steps and their replies, in order.
pub(crate) struct Steps {
    tx: mpsc::Sender<ForwardMessage>,
    replies: Replies,
}

impl Steps {
    /// Sends one step; false when the stream is broken (the next reply
    /// says why).
    pub async fn send(&mut self, req: ForwardRequest) -> bool {
        let m = ForwardMessage {
            message: Some(Message::Step(req)),
        };
        self.tx.send(m).await.is_ok()
    }

    /// Lets the first stage start `steps` more ring steps of `seq`; false
    /// when the stream is broken.
    pub async fn send_credit(&mut self, seq: &str, steps: u32) -> bool {
        let credit = RingCredit {
            sequence_id: seq.to_string(),
            steps,
        };
        let m = ForwardMessage {
            message: Some(Message::Credit(credit)),
        };
        self.tx.send(m).await.is_ok()
    }

    /// The next reply; `None` when the stream ended. Cancel-safe: a wait
    /// given up loses nothing.
    pub async fn message(&mut self) -> std::result::Result<Option<ForwardReply>, Status> {
        self.replies.next().await.transpose()
    }

    /// Ends the stream: the worker then releases the sequence (on every
    /// stage after it too).
    pub fn close(&mut self) {
        self.tx = mpsc::channel(1).0;
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
