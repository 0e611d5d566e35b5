//! Running code inside a private network namespace (tests, probes).

use std::{fs::File, future::Future, io, os::fd::AsRawFd, path::PathBuf, thread};

/// Runs `f` on a new thread that first moves into a fresh network namespace
/// (`unshare(CLONE_NEWNET)`), inside a current-thread tokio runtime built after the move, so
/// every netlink socket it opens lives in that namespace. The namespace disappears with the
/// thread, so nothing it created outlives it even if `f` panics (the panic is re-raised here).
///
/// Needs `CAP_SYS_ADMIN` (root).
pub fn run_in_new_netns<F, Fut, T>(f: F) -> io::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    on_netns_thread(
        || {
            // SAFETY: unshare takes no pointers; CLONE_NEWNET only changes the network namespace
            // of this thread (network namespaces are per thread), which is what we want.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        },
        f,
    )
}

/// Runs `f` like [`run_in_new_netns`], but inside an existing network namespace given by a path
/// such as `/run/netns/NAME` (what `ip netns add NAME` creates).
pub fn run_in_netns<F, Fut, T>(path: impl Into<PathBuf>, f: F) -> io::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let path = path.into();
    on_netns_thread(
        move || {
            let ns = File::open(&path)?;
            // SAFETY: `ns` is an open file descriptor for the duration of the call; setns with
            // CLONE_NEWNET only moves this thread into that network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        },
        f,
    )
}

/// The common part of both: a new thread runs `enter` (which moves it into a namespace), then
/// `f` on a current-thread runtime built after the move; a panic in `f` is re-raised here.
fn on_netns_thread<E, F, Fut, T>(enter: E, f: F) -> io::Result<T>
where
    E: FnOnce() -> io::Result<()> + Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let worker = thread::Builder::new().name("netns".into()).spawn(move || {
        enter()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(f()))
    })?;
    match worker.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
