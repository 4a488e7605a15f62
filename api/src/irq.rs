//! MSI-X delivery to a vfio-user client: one eventfd per vector, set with `SET_IRQS`. The client
//! emulates the MSI-X table; it masks and unmasks vectors with `SET_IRQS` `ACTION_MASK` /
//! `ACTION_UNMASK`, and the device keeps a pending bit for masked vectors.
//!
//! The descriptors come from the client, which is not trusted: interrupts are raised on the
//! shared engine threads, so a write that blocks (a full pipe, a socket nobody reads, a blocking
//! eventfd whose counter the client pushed to its maximum) would stall every vGPU on that
//! engine. [`check_eventfd`] therefore accepts only eventfds and makes them non-blocking.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, PoisonError};

use vgpu_abi::pci::MSIX_VECTORS;
use vgpu_device::irq::InterruptSink;

const N: usize = MSIX_VECTORS as usize;

/// Accepts `f` as an interrupt descriptor only if it is an eventfd, and sets `O_NONBLOCK` on
/// it so that signalling it never blocks (the clients we know create their eventfds
/// non-blocking anyway). Returns why not otherwise.
pub fn check_eventfd(f: &File) -> Result<(), String> {
    let fd = f.as_raw_fd();
    match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(target) if target.as_os_str() == "anon_inode:[eventfd]" => {}
        Ok(target) => return Err(format!("fd is not an eventfd ({})", target.display())),
        Err(_) => {
            // No /proc: at least insist on an anonymous inode (no pipe, socket or file).
            let meta = f.metadata().map_err(|e| format!("fstat: {e}"))?;
            if std::os::unix::fs::MetadataExt::mode(&meta) & libc::S_IFMT != 0 {
                return Err("fd is not an eventfd".into());
            }
        }
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[derive(Default)]
struct Vectors {
    fds: [Option<File>; N],
    masked: [bool; N],
    pending: [bool; N],
    delivered: [u64; N],
}

/// Eventfds of the MSI-X vectors of one vGPU.
#[derive(Default)]
pub struct EventFdSink {
    v: Mutex<Vectors>,
}

impl EventFdSink {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vectors> {
        self.v.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Assigns (or with `None`, removes) the eventfds of vectors `start..start + fds.len()`.
    pub fn set_fds(&self, start: usize, fds: Vec<Option<File>>) {
        let mut v = self.lock();
        for (i, fd) in fds.into_iter().enumerate() {
            if let Some(slot) = v.fds.get_mut(start + i) {
                *slot = fd;
            }
        }
    }

    /// Removes every eventfd (MSI-X disabled, or the client went away).
    pub fn clear(&self) {
        *self.lock() = Vectors::default();
    }

    /// Masks or unmasks vectors `start..start + count`; unmasking delivers pending ones.
    pub fn set_masked(&self, start: usize, count: usize, masked: bool) {
        let mut v = self.lock();
        for i in start..(start + count).min(N) {
            v.masked[i] = masked;
            if !masked && v.pending[i] {
                v.pending[i] = false;
                Self::signal(&mut v, i);
            }
        }
    }

    /// Vectors delivered so far, per vector.
    pub fn delivered(&self) -> [u64; N] {
        self.lock().delivered
    }

    fn signal(v: &mut Vectors, i: usize) {
        if let Some(f) = v.fds[i].as_mut() {
            // An eventfd write of 1 increments its counter; EAGAIN (counter full) still means
            // the client has an event pending, which is all MSI-X needs.
            if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
                tracing::debug!(vector = i, error = %e, "eventfd write failed");
            }
            v.delivered[i] += 1;
        }
    }
}

impl InterruptSink for EventFdSink {
    fn trigger(&self, vector: u16) {
        let i = usize::from(vector);
        let mut v = self.lock();
        if i >= N {
            return;
        }
        if v.masked[i] {
            v.pending[i] = true;
        } else {
            Self::signal(&mut v, i);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::FromRawFd;

    use super::*;

    fn pipe() -> (File, File) {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors; the result is checked.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are fresh and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn test_check_eventfd_pipe_socket_and_file_rejected() {
        let (_r, w) = pipe();
        assert!(check_eventfd(&w).is_err(), "a pipe");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(check_eventfd(&File::from(std::os::fd::OwnedFd::from(a))).is_err());
        let f = File::open("/dev/null").unwrap();
        assert!(check_eventfd(&f).is_err(), "a device file");
    }

    #[test]
    fn test_blocking_eventfd_at_its_maximum_made_nonblocking_signal_returns() {
        // SAFETY: plain eventfd creation; the result is checked.
        let fd = unsafe { libc::eventfd(0, 0) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor owned by nobody else.
        let mut client = unsafe { File::from_raw_fd(fd) };
        // The client pushes the counter to its maximum: a blocking `+1` would now wait forever.
        client.write_all(&(u64::MAX - 1).to_ne_bytes()).unwrap();
        let dev = client.try_clone().unwrap();
        check_eventfd(&dev).unwrap();
        let sink = EventFdSink::default();
        sink.set_fds(0, vec![Some(dev)]);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            sink.trigger(0);
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("signalling a saturated eventfd blocked");
        t.join().unwrap();
        let mut b = [0u8; 8];
        client.read_exact(&mut b).unwrap();
        assert_eq!(
            u64::from_ne_bytes(b),
            u64::MAX - 1,
            "the event is still pending"
        );
    }
}
