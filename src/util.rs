//! Small helpers that many modules share, with a home of their own so
//! that no module imports another just for them.
use std::sync::OnceLock;

/// Locks `m`, taking the data of a poisoned mutex as it is (a panic elsewhere
/// must not stop the coordinator).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tokio runtime that carries all coordinator-side network work.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("mlx-dist-net")
            .build()
            .expect("cannot start the network runtime")
    })
}
