//! The Forward stream: steps relayed to the next stage, and tokens sent
//! round the ring from the last stage to the first.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::service::{Peers, WorkerService};
use super::{BoxStream, Step};
use crate::error::Error;
use crate::proto::forward_message::Message;
use crate::proto::{ForwardMessage, ForwardReply, RingToken, Tensor};
use crate::transport::{from_next_stage, open_client, status_of, Client, TransportConfig};
use crate::util::lock;

/// This worker's stream to the next stage.
struct Downstream {
    addr: String,
    tx: mpsc::Sender<ForwardMessage>,
    rx: Streaming<ForwardReply>,
}

impl Downstream {
    async fn open(
        peers: &Peers,
        addr: &str,
        timeout: Duration,
        transport: &TransportConfig,
    ) -> std::result::Result<Downstream, Status> {
        let cached = lock(&peers.channels).get(addr).cloned();
        if let Some(client) = cached {
            if let Ok(d) = Self::open_on(client, addr, transport).await {
                return Ok(d);
            }
            // The stage behind it went away (or restarted): connect afresh.
            lock(&peers.channels).remove(addr);
        }
        // No probe: the stream itself tells whether the stage answers.
        let client = open_client(addr, timeout, false, transport)
            .await
            .map_err(status_of)?;
        let d = Self::open_on(client.clone(), addr, transport).await?;
        lock(&peers.channels).insert(addr.to_string(), client);
        Ok(d)
    }

    async fn open_on(
        mut client: Client,
        addr: &str,
        transport: &TransportConfig,
    ) -> std::result::Result<Downstream, Status> {
        let (tx, rx) = mpsc::channel(4);
        let rx = client
            .forward(ReceiverStream::new(rx))
            .await
            .map_err(|e| {
                let plain = !addr.starts_with("https://") && transport.tls_ca.is_none();
                // A plain connection made whose first call breaks in
                // transport: the next stage speaks TLS (as `open_client`'s
                // probe reads it). The peer's close shows as any of these,
                // depending on when it comes.
                let broke = std::error::Error::source(&e).is_some()
                    || matches!(
                        e.code(),
                        tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
                    );
                if plain && broke {
                    status_of(Error::Tls {
                        address: addr.to_string(),
                        detail: format!(
                            "does not answer plain gRPC: {} (if it serves TLS, start this worker with --tls-ca)",
                            e.message()
                        ),
                    })
                } else {
                    next_failed(addr, e.message().to_string())
                }
            })?
            .into_inner();
        Ok(Downstream {
            addr: addr.to_string(),
            tx,
            rx,
        })
    }
}

/// The next stage (at `addr`) failed: a refusal naming it, so that the
/// coordinator knows which stage it was.
fn next_failed(addr: &str, why: String) -> Status {
    status_of(Error::stage_failed(addr, addr, why))
}

/// One reply of the next stage, in order, within `timeout`.
async fn downstream_reply(
    rx: &mut Streaming<ForwardReply>,
    addr: &str,
    timeout: Duration,
) -> std::result::Result<ForwardReply, Status> {
    match tokio::time::timeout(timeout, rx.message()).await {
        Err(_) => Err(next_failed(
            addr,
            format!("no reply within {} s", timeout.as_secs()),
        )),
        Ok(r) => from_below(r, addr),
    }
}

/// What the next stage's stream gave, as this stage reports it.
fn from_below(
    r: std::result::Result<Option<ForwardReply>, Status>,
    addr: &str,
) -> std::result::Result<ForwardReply, Status> {
    match r {
        // Refusals of later stages already name them.
        Err(e) if e.metadata().contains_key(crate::transport::ADDRESS_KEY) => Err(e),
        // The stream itself broke: the next stage is gone.
        Err(e) if e.code() == tonic::Code::Unavailable || e.code() == tonic::Code::Unknown => {
            Err(next_failed(addr, format!("failed: {}", e.message())))
        }
        // The next stage's own refusal (its kind kept), said to be its own.
        Err(e) => Err(from_next_stage(e, addr)),
        Ok(None) => Err(next_failed(addr, "its stream ended".into())),
        Ok(Some(r)) => Ok(r),
    }
}

/// Where the reply to one request of a Forward stream comes from.
enum Slot {
    /// The stream to the next stage (at this address) was opened: its replies.
    Opened(Streaming<ForwardReply>, String),
    /// Made here (the last stage, a token come round the ring, or an error).
    Ready(std::result::Result<ForwardReply, Status>),
    /// The next stage's reply to the request sent on, plus this stage's time.
    Below { micros: u32, addr: String },
}

/// Requests of one Forward stream in flight below this stage at most.
const MAX_IN_FLIGHT: usize = 8;

/// Sends `token` round the ring to the first stage at `addr`, opening the
/// stream on first use and again if it broke.
async fn send_round(
    peers: &Peers,
    addr: &str,
    token: RingToken,
    transport: &TransportConfig,
) -> std::result::Result<(), Status> {
    let cached = lock(&peers.rings).get(addr).cloned();
    let token = match cached {
        Some(tx) => match tx.send(token).await {
            Ok(()) => return Ok(()),
            // The first stage went away (or restarted): reconnect.
            Err(mpsc::error::SendError(t)) => t,
        },
        None => token,
    };
    let mut client = open_client(addr, Duration::from_secs(10), false, transport)
        .await
        .map_err(status_of)?;
    let (tx, rx) = mpsc::channel(64);
    let ring = addr.to_string();
    tokio::spawn(async move {
        // The call lasts as long as the stream; when it ends, the next token
        // reconnects.
        if let Err(e) = client.ring(ReceiverStream::new(rx)).await {
            tracing::warn!("the ring to first stage {ring} ended: {}", e.message());
        }
    });
    tx.send(token)
        .await
        .map_err(|_| next_failed(addr, "the first stage closed the ring".into()))?;
    lock(&peers.rings).insert(addr.to_string(), tx);
    Ok(())
}

impl WorkerService {
    /// The Forward stream: steps run here, sent on down the chain or round
    /// the ring, replies back up in request order.
    pub(super) async fn relay(
        &self,
        request: Request<Streaming<ForwardMessage>>,
    ) -> std::result::Result<Response<BoxStream<ForwardReply>>, Status> {
        Ok(Response::new(Box::pin(
            self.relay_stream(request.into_inner()),
        )))
    }

    /// `relay` on any stream of messages: a gRPC call's, or those the
    /// coordinator of this process hands the worker inside it (no protobuf
    /// and no HTTP/2 in between, and the same ring, credits and release).
    pub(crate) fn relay_stream<S>(
        &self,
        upstream: S,
    ) -> ReceiverStream<std::result::Result<ForwardReply, Status>>
    where
        S: futures::Stream<Item = std::result::Result<ForwardMessage, Status>>
            + Send
            + Unpin
            + 'static,
    {
        let mut upstream = upstream;
        let (tx, rx) = mpsc::channel(4);
        // Replies go back in request order. A step sent on to the next stage
        // does not wait for that stage's reply before this stage takes the
        // next request, so the chunks of a long prompt flow through the
        // stages back to back; `slots` keeps the order (and bounds how many
        // steps are in flight below this stage).
        let (slots, mut pending) = mpsc::channel::<Slot>(MAX_IN_FLIGHT);
        let svc = self.clone();
        let replies = tx.clone();
        let timeout = svc.cfg.step_timeout;
        tokio::spawn(async move {
            let mut below: Option<(Streaming<ForwardReply>, String)> = None;
            // Replies that came from below before their slot did.
            let mut early = std::collections::VecDeque::new();
            loop {
                let slot = tokio::select! {
                    biased;
                    s = pending.recv() => match s {
                        Some(s) => s,
                        None => break,
                    },
                    // Ring steps get no reply from below, so the stream is
                    // watched while nothing waits on it: what comes is a
                    // reply whose slot is on its way, or a later stage's
                    // failure.
                    r = async { below.as_mut().unwrap().0.message().await }, if below.is_some() => {
                        let addr = &below.as_ref().unwrap().1;
                        match from_below(r, addr) {
                            Ok(r) => {
                                early.push_back(r);
                                continue;
                            }
                            Err(e) => Slot::Ready(Err(e)),
                        }
                    }
                };
                let reply = match slot {
                    Slot::Opened(rx, addr) => {
                        below = Some((rx, addr));
                        continue;
                    }
                    Slot::Ready(r) => r,
                    Slot::Below { micros, addr } => {
                        let r = match (early.pop_front(), below.as_mut()) {
                            (Some(r), _) => Ok(r),
                            (None, None) => Err(Status::internal("no stream to the next stage")),
                            (None, Some((rx, _))) => downstream_reply(rx, &addr, timeout).await,
                        };
                        r.map(|mut r| {
                            r.stage_micros.insert(0, micros);
                            r
                        })
                    }
                };
                let failed = reply.is_err();
                if replies.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut downstream: Option<(String, mpsc::Sender<ForwardMessage>)> = None;
            let mut seen: HashSet<String> = HashSet::new();
            // On the first stage: tokens of this stream's ring steps, come
            // round from the last stage.
            let (ring_tx, mut ring_rx) = mpsc::unbounded_channel::<RingToken>();
            // Ring steps each sequence whose ring starts here may still
            // start, and a token held for want of one.
            let mut credit: HashMap<String, u32> = HashMap::new();
            let mut held: HashMap<String, RingToken> = HashMap::new();
            loop {
                let msg = tokio::select! {
                    // The client's end first: no ring step after it.
                    biased;
                    m = futures::StreamExt::next(&mut upstream) => match m.transpose().map(|m| m.map(|m| m.message)) {
                        Ok(Some(Some(Message::Credit(m)))) => {
                            // The coordinator read a token: one more step.
                            let Some(c) = credit.get_mut(&m.sequence_id) else {
                                continue;
                            };
                            *c = c.saturating_add(m.steps);
                            match held.remove(&m.sequence_id) {
                                Some(t) if *c > 0 => {
                                    *c -= 1;
                                    Step::from(&t)
                                }
                                Some(t) => {
                                    held.insert(m.sequence_id, t);
                                    continue;
                                }
                                None => continue,
                            }
                        }
                        // Checked once, here, as it becomes the engine's.
                        Ok(Some(Some(Message::Step(m)))) => match Step::try_from(m) {
                            Ok(step) => step,
                            Err(e) => {
                                tracing::warn!(worker = %svc.cfg.name, "step refused: {e}");
                                let _ = slots.send(Slot::Ready(Err(status_of(e)))).await;
                                break;
                            }
                        },
                        Ok(Some(None)) => {
                            let e = Status::invalid_argument("a Forward message with neither a step nor a ring credit");
                            let _ = slots.send(Slot::Ready(Err(e))).await;
                            break;
                        }
                        // The client finished: its sequences end.
                        Ok(None) => break,
                        // A message that is too large or does not decode, or
                        // a client that went away (then nobody hears this).
                        Err(e) => {
                            let e = if e.code() == tonic::Code::OutOfRange {
                                Status::resource_exhausted(format!(
                                    "worker {}: {} (raise its --max-message-mb)",
                                    svc.cfg.name,
                                    e.message()
                                ))
                            } else {
                                e
                            };
                            let _ = slots.send(Slot::Ready(Err(e))).await;
                            break;
                        }
                    },
                    Some(mut t) = ring_rx.recv() => {
                        // The token is the reply to the step that sampled it,
                        // and the next step starts here without the client.
                        let reply = ForwardReply {
                            sequence_id: t.sequence_id.clone(),
                            token: Some(t.token),
                            logprobs: t.logprobs.clone(),
                            stage_micros: std::mem::take(&mut t.stage_micros),
                        };
                        if slots.send(Slot::Ready(Ok(reply))).await.is_err() {
                            break;
                        }
                        if t.decode_ahead == 0 {
                            continue;
                        }
                        match credit.get_mut(&t.sequence_id) {
                            Some(c) if *c > 0 => {
                                *c -= 1;
                                Step::from(&t)
                            }
                            _ => {
                                held.insert(t.sequence_id.clone(), t);
                                continue;
                            }
                        }
                    }
                };
                let sequence = msg.sequence.clone();
                seen.insert(sequence.clone());
                if msg.decode_ahead > 0 && msg.hidden.is_none() && !credit.contains_key(&sequence) {
                    // The first stage of a ring: its tokens come back here.
                    lock(&svc.rings).insert(sequence.clone(), ring_tx.clone());
                    credit.insert(sequence.clone(), msg.ring_credit);
                }
                let ring = msg.decode_ahead > 0;
                let slot = match svc.step(msg.clone()).await {
                    Err(e) => Slot::Ready(Err(e)),
                    Ok(out) => match (out.hidden, out.token) {
                        (None, Some(token)) if ring => {
                            // The last stage of a ring step: the token goes
                            // straight to the first stage.
                            let mut stage_micros = msg.stage_micros.clone();
                            stage_micros.push(out.micros);
                            let round = RingToken {
                                sequence_id: msg.sequence.clone(),
                                offset: msg.offset + msg.positions(),
                                token,
                                logprobs: out.logprobs.map(Tensor::from),
                                stage_micros,
                                decode_ahead: msg.decode_ahead,
                            };
                            if msg.hidden.is_none() {
                                // A one-stage ring: this stage is also the
                                // first, whose stream is this one.
                                svc.ring_tokens.fetch_add(1, Ordering::Relaxed);
                                let _ = ring_tx.send(round);
                                continue;
                            }
                            match out.first {
                                None => Slot::Ready(Err(Status::failed_precondition(
                                    "this stage was loaded without the first stage's address: it cannot run ring steps",
                                ))),
                                Some(first) => match send_round(&svc.peers, &first, round, &svc.cfg.transport).await {
                                    Ok(()) => continue,
                                    Err(e) => Slot::Ready(Err(e)),
                                },
                            }
                        }
                        (None, token) => Slot::Ready(Ok(ForwardReply {
                            sequence_id: msg.sequence.clone(),
                            token,
                            logprobs: out.logprobs.map(Tensor::from),
                            stage_micros: vec![out.micros],
                        })),
                        (Some(hidden), _) => {
                            let next = out.next.unwrap_or_default();
                            if downstream.is_none() {
                                match Downstream::open(
                                    &svc.peers,
                                    &next,
                                    Duration::from_secs(10),
                                    &svc.cfg.transport,
                                )
                                .await
                                {
                                    Ok(d) => {
                                        if slots
                                            .send(Slot::Opened(d.rx, d.addr.clone()))
                                            .await
                                            .is_err()
                                        {
                                            break;
                                        }
                                        downstream = Some((d.addr, d.tx));
                                    }
                                    Err(e) => {
                                        let _ = slots.send(Slot::Ready(Err(e))).await;
                                        break;
                                    }
                                }
                            }
                            let (addr, down) = downstream.as_ref().unwrap();
                            let mut fwd = Step {
                                hidden: Some(hidden),
                                ..msg
                            };
                            if ring {
                                fwd.stage_micros.push(out.micros);
                            }
                            let fwd = ForwardMessage {
                                message: Some(Message::Step(fwd.into())),
                            };
                            svc.sent.0.fetch_add(
                                prost::Message::encoded_len(&fwd) as u64,
                                Ordering::Relaxed,
                            );
                            svc.sent.1.fetch_add(1, Ordering::Relaxed);
                            if down.send(fwd).await.is_err() {
                                Slot::Ready(Err(next_failed(addr, "its stream closed".into())))
                            } else if ring {
                                // Its token comes round the ring, not back up.
                                continue;
                            } else {
                                Slot::Below {
                                    micros: out.micros,
                                    addr: addr.clone(),
                                }
                            }
                        }
                    },
                };
                let failed = matches!(slot, Slot::Ready(Err(_)));
                if let Slot::Ready(Err(e)) = &slot {
                    tracing::warn!(worker = %svc.cfg.name, sequence = %sequence, "step failed: {}", e.message());
                }
                if slots.send(slot).await.is_err() || failed {
                    break;
                }
            }
            {
                let mut rings = lock(&svc.rings);
                for seq in credit.keys() {
                    rings.remove(seq);
                }
            }
            // Dropping the sender closes the next stage's stream, which
            // releases the same sequences there.
            drop(downstream);
            for seq in seen {
                svc.release(seq).await;
            }
        });
        ReceiverStream::new(rx)
    }
}
