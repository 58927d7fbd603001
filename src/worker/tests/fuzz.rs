//! Malformed and random requests: each gets an error, and the worker keeps
//! serving.
use super::*;

/// xorshift64*: a tiny seeded generator, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Fewer than `most` random bytes.
    fn some_bytes(&mut self, most: u64) -> Vec<u8> {
        let n = self.below(most) as usize;
        self.bytes(n)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// Sends `body` as the one message of a Forward stream, as it is: bytes
/// that need not be a ForwardRequest.
async fn raw_forward(addr: &str, body: Vec<u8>) -> std::result::Result<ForwardReply, Status> {
    struct Raw;
    impl tonic::codec::Encoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(
            &mut self,
            item: Vec<u8>,
            dst: &mut tonic::codec::EncodeBuf<'_>,
        ) -> std::result::Result<(), Status> {
            bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }
    struct Replies;
    impl tonic::codec::Decoder for Replies {
        type Item = ForwardReply;
        type Error = Status;
        fn decode(
            &mut self,
            src: &mut tonic::codec::DecodeBuf<'_>,
        ) -> std::result::Result<Option<ForwardReply>, Status> {
            prost::Message::decode(src)
                .map(Some)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }
    struct Codec;
    impl tonic::codec::Codec for Codec {
        type Encode = Vec<u8>;
        type Decode = ForwardReply;
        type Encoder = Raw;
        type Decoder = Replies;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Replies {
            Replies
        }
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/mlx_dist.v2.Worker/Forward");
    let mut replies = grpc
        .streaming(Request::new(tokio_stream::once(body)), path, Codec)
        .await?
        .into_inner();
    replies
        .message()
        .await?
        .ok_or_else(|| Status::internal("no reply"))
}

/// One way to spoil a valid step; each alone makes it invalid.
fn spoil(rng: &mut Rng, req: &mut ForwardRequest, limit: usize) -> String {
    let t = req.hidden.as_mut().unwrap();
    match rng.below(14) {
        0 => {
            let n = rng.below(t.data.len() as u64) as usize;
            t.data = t.data.slice(..n);
            format!("data truncated to {n} bytes")
        }
        1 => {
            let mut d = t.data.to_vec();
            d.push(0);
            d.extend(rng.some_bytes(64));
            t.data = d.into();
            "data too long".into()
        }
        2 => {
            t.dtype = rng.pick(&[-1, 0, 2, 3, 4, 5, 6, 7, 99, i32::MAX, i32::MIN]);
            format!("dtype {}", t.dtype)
        }
        3 => {
            let dims = [
                -1,
                0,
                1,
                2,
                3,
                255,
                256,
                257,
                1 << 20,
                (1 << 20) + 1,
                1 << 40,
                i64::MAX,
                i64::MIN,
            ];
            let rank = rng.below(6) as usize;
            let mut shape: Vec<i64> = (0..rank)
                .map(|_| {
                    if rng.below(4) == 0 {
                        rng.next() as i64
                    } else {
                        rng.pick(&dims)
                    }
                })
                .collect();
            if shape == [1, 1, 256] {
                shape[2] = 255;
            }
            t.shape = shape;
            format!("shape {:?}", t.shape)
        }
        4 => {
            t.compression = rng.pick(&[1, 2, 99, -1, i32::MIN]);
            format!("compression {}", t.compression)
        }
        5 => {
            let mut scales = vec![0u8];
            scales.extend(rng.some_bytes(64));
            t.scales = scales.into();
            "scales on an uncompressed tensor".into()
        }
        6 => {
            req.sequence_id = if rng.below(2) == 0 {
                String::new()
            } else {
                "s".repeat(257 + rng.below(1000) as usize)
            };
            format!("sequence id of {} characters", req.sequence_id.len())
        }
        7 => {
            req.offset = 1 + rng.below(1 << 20) as u32;
            format!("unknown sequence at offset {}", req.offset)
        }
        8 => {
            req.tokens = vec![0; MAX_POSITIONS + 1 + rng.below(100) as usize];
            format!("{} tokens", req.tokens.len())
        }
        9 => {
            t.data = vec![0u8; limit + rng.below(1 << 20) as usize].into();
            format!("a {} byte message", t.data.len())
        }
        10 => {
            req.max_length = (1 << 28) + rng.below(u32::MAX as u64 - (1 << 28)) as u32;
            format!("max_length {}", req.max_length)
        }
        11 => {
            req.prefix_id = format!("p{}", rng.next());
            "an unknown prefix".into()
        }
        12 => {
            let mut p = SamplingParams::default();
            p.logit_bias.insert(1024 + rng.below(1 << 30) as u32, 1.0);
            req.sampling = Some(p);
            "a logit bias outside the vocabulary".into()
        }
        _ => {
            req.hidden = None;
            "no activations".into()
        }
    }
}

#[test]
fn fuzzed_requests_get_errors_and_the_worker_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    crate::models::tests::write_llama(tmp.path(), 3);
    let limit = 2 << 20;
    crate::util::runtime().block_on(async {
        let mut cfg = WorkerConfig::new("fuzz");
        cfg.cache_dir = tmp.path().join("cache");
        cfg.max_message_bytes = limit;
        cfg.max_sequences = 2;
        let (addr, mut client) = start_with(tmp.path(), cfg).await;
        let good = encode(
            &Array::full(&[1, 1, 256], 0.01, crate::mlx::Dtype::Float32).unwrap(),
            Compression::None,
        )
        .unwrap();
        let path = tmp.path().display().to_string();
        let valid_load = LoadShardRequest {
            source: Some(ProtoSource {
                path: path.clone(),
                model_id: String::new(),
            }),
            layer_start: 1,
            layer_end: 3,
            head: true,
            cache_budget: 1 << 30,
            ..Default::default()
        };
        let started = Instant::now();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut kinds = [0usize; 4];
        for i in 0..400 {
            let kind = match rng.below(16) {
                0..=3 => 0,
                4..=12 => 1,
                13..=14 => 2,
                _ => 3,
            };
            kinds[kind] += 1;
            match kind {
                // Raw bytes on the port, then gone.
                0 => {
                    use tokio::io::AsyncWriteExt as _;
                    let mut junk = if rng.below(2) == 0 {
                        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
                    } else {
                        Vec::new()
                    };
                    junk.extend(rng.some_bytes(4096));
                    within("raw bytes", async {
                        let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
                        // The worker may hang up first: that is fine.
                        let _ = raw.write_all(&junk).await;
                    })
                    .await;
                }
                // A valid step spoiled one way.
                1 => {
                    let mut req = step(&format!("f{i}"), good.clone());
                    let what = spoil(&mut rng, &mut req, limit);
                    let r = within(&what, one_step(&mut client, req)).await;
                    assert!(r.is_err(), "{what}: a reply, not an error");
                }
                // Bytes that need not be a ForwardRequest.
                2 => {
                    let body = rng.some_bytes(2048);
                    let r = within("raw protobuf", raw_forward(&addr, body)).await;
                    assert!(r.is_err(), "random bytes got a reply");
                }
                // A shard that cannot be loaded; then the valid one again.
                _ => {
                    let mut req = valid_load.clone();
                    let ends = [0, 1, 2, 3, 4, 5, 1000, u32::MAX];
                    let what = match rng.below(4) {
                        0 => {
                            req.layer_start = 1 + rng.below(u32::MAX as u64 - 1) as u32;
                            req.layer_end = rng.below(req.layer_start as u64) as u32;
                            "start after end".to_string()
                        }
                        1 => {
                            req.layer_start = rng.pick(&ends[..4]);
                            req.layer_end = rng.pick(&ends[4..]);
                            "beyond the model".to_string()
                        }
                        2 => {
                            req.source = Some(ProtoSource {
                                path: String::new(),
                                model_id: rng.pick(&["", "../x", "a/b", "no-such-model"]).into(),
                            });
                            "a bad model id".to_string()
                        }
                        _ => {
                            req.source = Some(ProtoSource {
                                path: format!("{path}/missing-{}", rng.next()),
                                model_id: String::new(),
                            });
                            "a missing path".to_string()
                        }
                    };
                    let what = format!("load: {what} ({}..{})", req.layer_start, req.layer_end);
                    let r = within(&what, load(&mut client, req)).await;
                    assert!(r.is_err(), "{what}: loaded");
                    within("reload", load(&mut client, valid_load.clone()))
                        .await
                        .unwrap();
                }
            }
        }
        assert!(kinds.iter().all(|&k| k > 10), "{kinds:?}");

        // One sequence more than allowed, on one stream.
        let (tx, rx) = mpsc::channel(4);
        let mut replies = client
            .forward(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        for seq in ["m1", "m2"] {
            tx.send(msg(step(seq, good.clone()))).await.unwrap();
            let r = within("a step", replies.message()).await.unwrap().unwrap();
            assert!(r.token.is_some());
        }
        tx.send(msg(step("m3", good.clone()))).await.unwrap();
        let err = within("a third sequence", replies.message())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert_eq!(kind_of(&err), Some(KV_BUDGET_FULL), "{err:?}");
        assert!(err.message().contains("max-sequences"), "{err:?}");
        drop(tx);

        // An oversize message is refused with a clear word, and as no
        // shortage of room that waiting mends (no kind).
        let mut big = good.clone();
        big.data = vec![0u8; limit + 1].into();
        let err = one_step(&mut client, step("big", big)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert_eq!(kind_of(&err), None, "{err:?}");
        assert!(err.message().contains("max-message-mb"), "{err:?}");

        // Still serving.
        let reply = within(
            "a valid step",
            one_step(&mut client, step("ok", good.clone())),
        )
        .await
        .unwrap();
        assert!(reply.token.is_some());
        let info = within(
            "device info",
            client.get_device_info(DeviceInfoRequest::default()),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(info.engine.unwrap().shard.unwrap().layer_end, 3);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?}",
            started.elapsed()
        );
    });
}
