//! A stage's refusals about the next stage: which stage failed, and how,
//! travel as data that the coordinator reads back as the same `Error`.
use super::*;

/// The kind a refusal names in its metadata.
pub(super) fn kind_of(s: &Status) -> Option<&str> {
    s.metadata()
        .get(ERROR_KIND_KEY)
        .and_then(|v| v.to_str().ok())
}

/// Reloads the worker behind `client` as a middle stage (layers 1..2, no
/// head) whose next stage is at `next`.
async fn relay_to(dir: &Path, client: &mut Client, next: &str) {
    let req = LoadShardRequest {
        source: Some(ProtoSource {
            path: dir.display().to_string(),
            model_id: String::new(),
        }),
        layer_start: 1,
        layer_end: 2,
        embed: false,
        head: false,
        next: next.into(),
        cache_budget: 1 << 30,
        ..Default::default()
    };
    load(client, req).await.unwrap();
}

#[test]
fn a_stage_names_the_next_stage_that_failed_by_kind() {
    use crate::transport::{error_of, ADDRESS_KEY, STAGE_FAILED, TLS};
    let tmp = tempfile::tempdir().unwrap();
    crate::models::tests::write_llama(tmp.path(), 3);
    let (cert, key) = make_certificate(&["127.0.0.1".into()]).unwrap();
    crate::util::runtime().block_on(async {
        let (addr, mut client) = start(tmp.path()).await;
        let hidden = encode(
            &Array::full(&[1, 1, 256], 0.01, crate::mlx::Dtype::Float32).unwrap(),
            Compression::None,
        )
        .unwrap();
        let named = |e: Status| {
            let from = e
                .metadata()
                .get_bin(ADDRESS_KEY)
                .and_then(|v| v.to_bytes().ok())
                .map(|b| String::from_utf8(b.to_vec()).unwrap());
            (kind_of(&e).map(str::to_string), from, e)
        };

        // A next stage that is not there: named as the one that failed.
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        relay_to(tmp.path(), &mut client, &gone).await;
        let err = within("a step", one_step(&mut client, step("a", hidden.clone())))
            .await
            .unwrap_err();
        let (kind, from, err) = named(err);
        assert_eq!(kind.as_deref(), Some(STAGE_FAILED), "{err:?}");
        assert_eq!(from.as_deref(), Some(gone.as_str()), "{err:?}");
        // As the coordinator reads it: that stage's failure, not this one's.
        let called = ("w0".to_string(), addr.clone());
        let e = error_of(err, |a| match a {
            None => called.clone(),
            Some(a) => ("w1".into(), a.into()),
        });
        assert!(
            matches!(&e, Error::StageFailed { stage, address, .. } if stage == "w1" && address == &gone),
            "{e:?}"
        );

        // A next stage serving TLS to this plain one: a TLS mismatch there.
        // (The test's own client trusts it; the relaying stage does not.)
        let mut cfg = WorkerConfig::new("tls-next");
        cfg.cache_dir = tmp.path().join("cache");
        cfg.tls = Some(TlsIdentity::new(cert.clone(), key).unwrap());
        cfg.transport.tls_ca = Some(cert.clone());
        let (tls_addr, _tls_client) = start_with(tmp.path(), cfg).await;
        relay_to(tmp.path(), &mut client, &tls_addr).await;
        let err = within("a step", one_step(&mut client, step("b", hidden.clone())))
            .await
            .unwrap_err();
        let (kind, from, err) = named(err);
        assert_eq!(kind.as_deref(), Some(TLS), "{err:?}");
        assert_eq!(from.as_deref(), Some(tls_addr.as_str()), "{err:?}");
        let e = error_of(err, |_| called.clone());
        assert!(
            matches!(&e, Error::Tls { address, .. } if address == &tls_addr),
            "{e:?}"
        );
    });
}
