//! Fault injection: a stream that breaks the connection after a given number of written bytes,
//! for testing that a cut at any point of the protocol is handled.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

/// Streams whose connection can be closed in both directions at once (the peer then reads
/// end-of-file and its writes fail).
pub trait Shutdown {
    /// Closes both directions.
    fn shutdown(&mut self) -> io::Result<()>;
}

impl Shutdown for UnixStream {
    fn shutdown(&mut self) -> io::Result<()> {
        UnixStream::shutdown(self, std::net::Shutdown::Both)
    }
}

impl Shutdown for TcpStream {
    fn shutdown(&mut self) -> io::Result<()> {
        TcpStream::shutdown(self, std::net::Shutdown::Both)
    }
}

/// Passes through the first `budget` written bytes, then shuts the connection down: the write
/// that crosses the budget writes what fits and every later read or write fails.
#[derive(Debug)]
pub struct CutStream<S> {
    inner: S,
    budget: u64,
    cut: bool,
}

impl<S: Shutdown> CutStream<S> {
    /// Wraps `inner`, cutting after `budget` written bytes.
    pub fn new(inner: S, budget: u64) -> Self {
        CutStream {
            inner,
            budget,
            cut: false,
        }
    }

    /// Whether the cut has happened.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    fn cut_now(&mut self) -> io::Error {
        if !self.cut {
            self.cut = true;
            // Best effort: the connection is being broken on purpose.
            let _ = self.inner.shutdown();
        }
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            "connection cut (fault injection)",
        )
    }
}

impl<S: Read + Shutdown> Read for CutStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cut {
            return Err(self.cut_now());
        }
        self.inner.read(buf)
    }
}

impl<S: Write + Shutdown> Write for CutStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.cut || self.budget == 0 {
            return Err(self.cut_now());
        }
        let allowed = usize::try_from(self.budget).unwrap_or(usize::MAX);
        let n = self.inner.write(&buf[..buf.len().min(allowed)])?;
        self.budget -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.cut {
            return Err(self.cut_now());
        }
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{mem_pipe, MemPipeConfig};
    use super::*;

    #[test]
    fn test_cut_stream_cuts_after_budget_and_peer_sees_eof() {
        let (a, mut b) = mem_pipe(&MemPipeConfig::default());
        let mut a = CutStream::new(a, 5);
        assert!(a.write_all(b"0123456789").is_err());
        assert!(a.is_cut());
        assert!(a.write(b"x").is_err());
        assert!(a.read(&mut [0u8; 1]).is_err());
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"01234");
    }
}
