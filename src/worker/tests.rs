//! Tests of a served worker through its gRPC API, and their helpers.
use super::*;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use super::serve::{incoming, server_builder};
use super::service::WorkerService;
use crate::codec;
use crate::mlx::Array;
use crate::models::Model;
use crate::proto::worker_server::Worker;
use crate::proto::{
    Compression, DeviceInfoRequest, ForwardReply, ForwardRequest, LoadShardRequest,
    ModelSource as ProtoSource, ReleaseRequest, SamplingParams, ShardInfo, Tensor,
};
use crate::sharding::Footprint;
use crate::transport::{
    connect, make_certificate, Client, TlsIdentity, TransportConfig, ERROR_KIND_KEY,
    KV_BUDGET_EXCEEDED, KV_BUDGET_FULL, PREFIX_MISSING,
};
use crate::weights::{resolve, Weights};

mod fuzz;
mod relayed;
use relayed::kind_of;

/// `a` encoded as the wire carries it.
fn encode(a: &Array, compression: Compression) -> crate::Result<Tensor> {
    codec::encode(a, compression).map(Tensor::from)
}

async fn start(dir: &Path) -> (String, Client) {
    let mut cfg = WorkerConfig::new("test");
    cfg.cache_dir = dir.join("cache");
    start_with(dir, cfg).await
}

/// A worker configured by `cfg` (TLS included) on a free port, holding
/// layers 1..3 and the head of the model in `dir`.
async fn start_with(dir: &Path, cfg: WorkerConfig) -> (String, Client) {
    let (addr, client, _) = start_with_jobs(dir, cfg).await;
    (addr, client)
}

/// `start_with`, and the engine's job queue (to hold it with `Job::Hold`).
async fn start_with_jobs(dir: &Path, cfg: WorkerConfig) -> (String, Client, std_mpsc::Sender<Job>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut builder = server_builder(&cfg).unwrap();
    // The client carries the worker's token and trusts its CA.
    let transport = cfg.transport.clone();
    let svc = WorkerService::new(cfg);
    let jobs = svc.jobs.clone();
    let server = svc.into_server();
    tokio::spawn(
        builder
            .add_service(server)
            .serve_with_incoming(incoming(listener)),
    );
    let mut client = connect(&addr, Duration::from_secs(5), &transport)
        .await
        .unwrap();
    let req = LoadShardRequest {
        source: Some(ProtoSource {
            path: dir.display().to_string(),
            model_id: String::new(),
        }),
        layer_start: 1,
        layer_end: 3,
        embed: false,
        head: true,
        cache_budget: 1 << 30,
        ..Default::default()
    };
    let mut progress = client.load_shard(req).await.unwrap().into_inner();
    while let Some(p) = progress.message().await.unwrap() {
        if p.done {
            break;
        }
    }
    (addr, client, jobs)
}

/// `f`'s result, or a test failure if it takes more than 10 s (a hang).
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
}

/// Loads a shard; an error of the call or of its progress stream is the
/// result's.
async fn load(
    client: &mut Client,
    req: LoadShardRequest,
) -> std::result::Result<ShardInfo, Status> {
    let mut progress = client.load_shard(req).await?.into_inner();
    while let Some(p) = progress.message().await? {
        if p.done {
            return p
                .shard
                .ok_or_else(|| Status::internal("done without a shard"));
        }
    }
    Err(Status::internal("the load ended before it was done"))
}

/// A step as the one message of a Forward stream.
fn msg(req: ForwardRequest) -> crate::proto::ForwardMessage {
    crate::proto::ForwardMessage {
        message: Some(crate::proto::forward_message::Message::Step(req)),
    }
}

async fn one_step(
    client: &mut Client,
    req: ForwardRequest,
) -> std::result::Result<ForwardReply, Status> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(msg(req)).await.unwrap();
    let mut replies = client.forward(ReceiverStream::new(rx)).await?.into_inner();
    let r = replies.message().await?;
    r.ok_or_else(|| Status::internal("no reply"))
}

fn step(seq: &str, hidden: Tensor) -> ForwardRequest {
    ForwardRequest {
        sequence_id: seq.into(),
        hidden: Some(hidden),
        sample: true,
        tokens: vec![3],
        max_length: 8,
        ..Default::default()
    }
}

/// One step of a new sequence of `positions` positions (this stage
/// holds layers 1..3 and the head), kept as `keep_as` when it ends.
fn first_step(seq: &str, positions: i32, keep_as: &str) -> ForwardRequest {
    let hidden = encode(
        &Array::full(&[1, positions, 256], 0.01, crate::mlx::Dtype::Float32).unwrap(),
        Compression::None,
    )
    .unwrap();
    ForwardRequest {
        tokens: vec![3; positions as usize],
        keep_as: keep_as.into(),
        max_length: 16,
        ..step(seq, hidden)
    }
}

async fn prefix_entries(client: &mut Client, want: u32) -> crate::proto::EngineStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = client
            .get_device_info(DeviceInfoRequest::default())
            .await
            .unwrap()
            .into_inner()
            .engine
            .unwrap();
        if info.prefix_entries == want || Instant::now() > deadline {
            return info;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn prefixes_are_kept_found_refused_by_kind_and_forgotten() {
    let tmp = tempfile::tempdir().unwrap();
    crate::models::tests::write_llama(tmp.path(), 3);
    crate::util::runtime().block_on(async {
        let mut cfg = WorkerConfig::new("pfx");
        cfg.cache_dir = tmp.path().join("cache");
        cfg.prefix_cache_bytes = 100 << 20;
        let (_addr, mut client) = start_with(tmp.path(), cfg).await;
        one_step(&mut client, first_step("a", 5, "pa"))
            .await
            .unwrap();
        let info = prefix_entries(&mut client, 1).await;
        assert_eq!(info.prefix_entries, 1);
        // The budget reported: the setting, within a quarter of the KV budget.
        assert_eq!(info.prefix_budget_bytes, 100 << 20);
        // Only the 5 positions are kept: 2 layers, K and V, 4 heads of 64 (f32).
        assert_eq!(info.prefix_bytes, 5 * 2 * 2 * 4 * 64 * 4);
        let mut from = first_step("b", 1, "");
        from.prefix_id = "pa".into();
        from.offset = 5;
        assert!(one_step(&mut client, from.clone())
            .await
            .unwrap()
            .token
            .is_some());
        // One not kept here is refused as a miss, by kind.
        from.sequence_id = "c".into();
        from.prefix_id = "gone".into();
        let err = one_step(&mut client, from).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let kind = err
            .metadata()
            .get(ERROR_KIND_KEY)
            .map(|v| v.to_str().unwrap());
        assert_eq!(kind, Some(PREFIX_MISSING), "{err:?}");
        // Forgotten: the kept one, and a live one not to be kept.
        let (tx, rx) = mpsc::channel(2);
        tx.send(msg(first_step("d", 2, "pd"))).await.unwrap();
        let mut replies = client
            .forward(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert!(replies.message().await.unwrap().is_some());
        let mut e = first_step("e", 2, "");
        e.forget_prefixes = vec!["pa".into(), "pd".into(), "never".into()];
        one_step(&mut client, e).await.unwrap();
        drop((tx, replies));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let info = prefix_entries(&mut client, 0).await;
        assert_eq!((info.prefix_entries, info.prefix_bytes), (0, 0));
    });
}

#[test]
fn device_info_answers_while_the_engine_is_busy() {
    let svc = WorkerService::new(WorkerConfig::new("busy"));
    let ask = |svc: &WorkerService| {
        crate::util::runtime().block_on(async {
            let asked = svc.get_device_info(Request::new(DeviceInfoRequest::default()));
            tokio::time::timeout(Duration::from_secs(30), asked)
                .await
                .expect("GetDeviceInfo waited for the busy engine")
                .unwrap()
                .into_inner()
        })
    };
    assert_eq!(ask(&svc).busy_for_micros, 0);
    let (release, until) = std_mpsc::channel();
    svc.jobs.send(Job::Hold(until)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let info = ask(&svc);
    assert!(info.busy_for_micros >= 100_000, "{}", info.busy_for_micros);
    assert_eq!(info.device.unwrap().name, "busy");
    drop(release);
    assert_eq!(ask(&svc).busy_for_micros, 0);
}

#[test]
fn calls_without_the_cluster_token_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    crate::models::tests::write_llama(tmp.path(), 3);
    let with = |token: Option<&str>| TransportConfig::default().with_token(token.map(Into::into));
    crate::util::runtime().block_on(async {
        let mut cfg = WorkerConfig::new("test");
        cfg.cache_dir = tmp.path().join("cache");
        cfg.transport = with(Some("s3cret"));
        let (addr, mut client) = start_with(tmp.path(), cfg).await;
        assert!(client
            .get_device_info(DeviceInfoRequest::default())
            .await
            .is_ok());
        let mut other = connect(&addr, Duration::from_secs(5), &with(Some("wrong")))
            .await
            .unwrap();
        let err = other
            .get_device_info(DeviceInfoRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut none = connect(&addr, Duration::from_secs(5), &with(None))
            .await
            .unwrap();
        assert!(none
            .release(ReleaseRequest {
                sequence_id: "x".into()
            })
            .await
            .is_err());
    });
}

#[test]
fn the_kv_budget_counts_the_longest_rows_room_for_every_row() {
    let tmp = tempfile::tempdir().unwrap();
    crate::models::tests::write_llama(tmp.path(), 3);
    let weights = Weights::open(&resolve(tmp.path().to_str().unwrap()).unwrap()).unwrap();
    let m = Model::load(&weights, None).unwrap();
    let fp = Footprint::from_weights(&weights, &m.args, m.tied());
    let per_token: u64 = fp.kv_bytes_per_token[1..3].iter().sum();
    crate::util::runtime().block_on(async {
        let (_addr, mut client) = start(tmp.path()).await;
        // Room for 1500 tokens: a sequence of 1000 and one of 8 fit by
        // their sum, but each row of the shared cache gets 1024.
        load(
            &mut client,
            LoadShardRequest {
                source: Some(ProtoSource {
                    path: tmp.path().display().to_string(),
                    model_id: String::new(),
                }),
                layer_start: 1,
                layer_end: 3,
                head: true,
                cache_budget: per_token * 1500,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let good = encode(
            &Array::full(&[1, 1, 256], 0.01, crate::mlx::Dtype::Float32).unwrap(),
            Compression::None,
        )
        .unwrap();
        let (tx, rx) = mpsc::channel(1);
        let mut replies = client
            .forward(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut long = step("long", good.clone());
        long.max_length = 1000;
        tx.send(msg(long)).await.unwrap();
        assert!(replies.message().await.unwrap().unwrap().token.is_some());
        let err = one_step(&mut client, step("short", good.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        // Full for now, by kind: the coordinator waits, it does not give up.
        assert_eq!(kind_of(&err), Some(KV_BUDGET_FULL), "{err:?}");
        assert!(
            err.message()
                .contains("2 sequences with room for 1024 tokens"),
            "{err:?}"
        );
        // Once the long one ends, the short one fits.
        drop((tx, replies));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match one_step(&mut client, step("short", good.clone())).await {
                Ok(r) => break assert!(r.token.is_some()),
                Err(e) if Instant::now() < deadline => {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("still refused: {e:?}"),
            }
        }
    });
}

#[test]
fn bad_messages_are_refused_and_the_worker_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    crate::models::tests::write_llama(tmp.path(), 3);
    crate::util::runtime().block_on(async {
        let (addr, mut client) = start(tmp.path()).await;
        let good = encode(
            &Array::full(&[1, 1, 256], 0.01, crate::mlx::Dtype::Float32).unwrap(),
            Compression::None,
        )
        .unwrap();

        let mut truncated = good.clone();
        truncated.data = truncated.data.slice(..10);
        let err = one_step(&mut client, step("a", truncated))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

        let mut wrong_shape = good.clone();
        wrong_shape.shape = vec![1, 2, 128];
        let err = one_step(&mut client, step("b", wrong_shape))
            .await
            .unwrap_err();
        assert!(err.message().contains("do not fit"), "{err:?}");

        let mut bad_dtype = good.clone();
        bad_dtype.dtype = 99;
        assert!(one_step(&mut client, step("c", bad_dtype)).await.is_err());

        let mut late = step("d", good.clone());
        late.offset = 5;
        let err = one_step(&mut client, late).await.unwrap_err();
        assert!(err.message().contains("unknown"), "{err:?}");

        let mut huge = step("e", good.clone());
        huge.max_length = 1 << 31;
        let err = one_step(&mut client, huge).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert_eq!(kind_of(&err), Some(KV_BUDGET_EXCEEDED), "{err:?}");

        // Garbage on the raw port, then a truncated gRPC frame.
        for junk in [
            &b"\x00\x01garbage that is not http/2"[..],
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"[..],
        ] {
            use tokio::io::AsyncWriteExt as _;
            let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
            raw.write_all(junk).await.unwrap();
            drop(raw);
        }

        let reply = one_step(&mut client, step("f", good.clone()))
            .await
            .unwrap();
        assert!(reply.token.is_some());
        assert_eq!(reply.stage_micros.len(), 1);
    });
}

/// Decode steps queued together run as one batch; a row whose bytes do
/// not fit its shape (one short, one long: together the batch's size)
/// fails its own sequence alone, and the others get their tokens.
#[test]
fn a_bad_row_fails_alone_in_a_batched_step() {
    let tmp = tempfile::tempdir().unwrap();
    crate::models::tests::write_llama(tmp.path(), 3);
    crate::util::runtime().block_on(async {
        let mut cfg = WorkerConfig::new("batch");
        cfg.cache_dir = tmp.path().join("cache");
        let (addr, mut client, jobs) = start_with_jobs(tmp.path(), cfg).await;
        let row = |v: f64| {
            encode(
                &Array::full(&[1, 1, 256], v, crate::mlx::Dtype::Float32).unwrap(),
                Compression::None,
            )
            .unwrap()
        };
        // A sequence lives as long as its Forward stream: one each.
        let names = ["a", "b", "c", "d"];
        let mut streams = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let (tx, rx) = mpsc::channel(2);
            tx.send(msg(step(name, row(0.01 * i as f64))))
                .await
                .unwrap();
            let mut replies = client
                .forward(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            assert!(replies.message().await.unwrap().is_some());
            streams.push((tx, replies));
        }
        let batches = || async {
            let mut c = connect(&addr, Duration::from_secs(5), &TransportConfig::default())
                .await
                .unwrap();
            c.get_device_info(DeviceInfoRequest::default())
                .await
                .unwrap()
                .into_inner()
                .engine
                .unwrap()
                .batches
        };
        let before = batches().await;
        let (release, until) = std_mpsc::channel();
        jobs.send(Job::Hold(until)).unwrap();
        for (i, (name, (tx, _))) in names.iter().zip(&streams).enumerate() {
            let mut hidden = row(0.02 * i as f64);
            let mut data = hidden.data.to_vec();
            match *name {
                "b" => data.truncate(data.len() - 1),
                "c" => data.push(0),
                _ => {}
            }
            hidden.data = data.into();
            let mut req = step(name, hidden);
            req.offset = 1;
            tx.send(msg(req)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        release.send(()).unwrap();
        for (name, (_, replies)) in names.iter().zip(&mut streams) {
            let r = within("a batched step", replies.message()).await;
            match *name {
                "b" | "c" => {
                    let err = r.unwrap_err();
                    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err:?}");
                    assert!(err.message().contains("bytes"), "{name}: {err:?}");
                }
                _ => assert!(r.unwrap().unwrap().token.is_some(), "{name}"),
            }
        }
        assert_eq!(
            batches().await,
            before + 1,
            "the steps did not run as one batch"
        );
    });
}

#[test]
fn tls_workers_answer_only_clients_that_trust_them() {
    let tmp = tempfile::tempdir().unwrap();
    crate::models::tests::write_llama(tmp.path(), 3);
    let (cert, key) = make_certificate(&["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (other, _) = make_certificate(&["127.0.0.1".into(), "localhost".into()]).unwrap();
    let trusting = |ca: Option<String>| TransportConfig::default().with_tls_ca(ca).unwrap();
    crate::util::runtime().block_on(async {
        let mut cfg = WorkerConfig::new("tls");
        cfg.cache_dir = tmp.path().join("cache");
        cfg.tls = Some(TlsIdentity::new(cert.clone(), key).unwrap());
        cfg.transport = trusting(Some(cert.clone()));
        let (addr, mut client) = start_with(tmp.path(), cfg).await;
        let good = encode(
            &Array::full(&[1, 1, 256], 0.01, crate::mlx::Dtype::Float32).unwrap(),
            Compression::None,
        )
        .unwrap();
        let reply = one_step(&mut client, step("a", good.clone()))
            .await
            .unwrap();
        assert!(reply.token.is_some());
        let port = addr.rsplit_once(':').unwrap().1;
        let tls = trusting(Some(cert.clone()));
        let mut by_name = connect(&format!("localhost:{port}"), Duration::from_secs(5), &tls)
            .await
            .unwrap();
        assert!(by_name
            .get_device_info(DeviceInfoRequest::default())
            .await
            .is_ok());

        // A client trusting another CA, one without TLS, and a TLS
        // client of a plain worker fail at once, naming the worker.
        let (plain, _) = start(tmp.path()).await;
        for (ca, to, word) in [
            (Some(other), &addr, "certificate"),
            (None, &addr, "TLS"),
            (Some(cert.clone()), &plain, "TLS"),
        ] {
            let t = Instant::now();
            let Err(err) = connect(to, Duration::from_secs(5), &trusting(ca)).await else {
                panic!("connected to {to}");
            };
            assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
            let msg = err.to_string();
            assert!(msg.contains(to.as_str()) && msg.contains(word), "{msg}");
            assert!(
                matches!(err, Error::Tls { ref address, .. } if address == to),
                "{msg}"
            );
        }
        // A worker that is not up is worth trying again.
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        for ca in [None, Some(cert.clone())] {
            let err = connect(&gone, Duration::from_secs(2), &trusting(ca))
                .await
                .unwrap_err();
            assert!(matches!(err, Error::StageFailed { .. }), "{err}");
        }
    });
}
