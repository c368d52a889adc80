//! The TCP rendezvous of ranks in separate processes (`--dist-init HOST:PORT --rank R --world W`),
//! their bootstrap and liveness, and the connections later messages travel on
//! ([`Session::send_to`], [`Session::receive_from`], [`Session::into_streams`]): rank 0 listens ([`listen`], [`Listener::accept_ranks`]), ranks
//! `1..W` connect ([`connect`]) and say who they are; once all have joined, rank 0 hands every rank
//! the same bootstrap blob (what an NCCL unique id would travel in) and keeps one connection to
//! each. [`Session::barrier`] then checks that every rank is still there.
//!
//! The protocol is one text line per message: `HELLO <world> <rank>`, then `GO <blob hex>` or
//! `ABORT <reason>`; `BARRIER <n>`, answered by `PASS <n>` or `ABORT <reason>`; `MIN <n>` to rank
//! 0, answered by `MIN <least>` ([`Session::agree_min`]).
//!
//! Nothing waits forever: a rank that has not joined by the timeout makes rank 0 fail with
//! [`RendezvousError::JoinTimeout`] naming it, and every joined rank receive an `ABORT` naming it
//! ([`RendezvousError::Aborted`]); a rank whose connection closes (its process died) makes rank 0
//! fail with [`RendezvousError::PeerGone`] and abort the others; a rank 0 that dies is `PeerGone`
//! of rank 0 on every other rank; silence past the timeout is [`RendezvousError::Timeout`].

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Why the rendezvous or a liveness check failed. Each names the rank reporting it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RendezvousError {
    /// `HOST:PORT` names no address, or it cannot be listened on.
    #[error("rank {rank}: cannot use --dist-init {addr}: {reason}")]
    Address {
        /// The rank reporting.
        rank: usize,
        /// The address given.
        addr: String,
        /// What the OS said.
        reason: String,
    },
    /// A rank number not below the world size, or a world of zero.
    #[error("rank {rank} is not below world size {world}")]
    BadRank {
        /// The rank given.
        rank: usize,
        /// The world size given.
        world: usize,
    },
    /// Rank 0 gave up waiting for ranks to join.
    #[error("rank 0: rank(s) {missing:?} did not join within {timeout:?}")]
    JoinTimeout {
        /// The ranks that never joined.
        missing: Vec<usize>,
        /// The timeout.
        timeout: Duration,
    },
    /// A rank could not reach rank 0.
    #[error("rank {rank}: no rank 0 listening at {addr} within {timeout:?}: {reason}")]
    NoCoordinator {
        /// The rank reporting.
        rank: usize,
        /// The address tried.
        addr: String,
        /// The timeout.
        timeout: Duration,
        /// The last connection error.
        reason: String,
    },
    /// Rank 0 aborted the group, saying why.
    #[error("rank {rank}: rank 0 aborted the group: {reason}")]
    Aborted {
        /// The rank reporting.
        rank: usize,
        /// Rank 0's reason.
        reason: String,
    },
    /// A peer's connection closed: its process ended.
    #[error("rank {rank}: rank {gone} is gone (its connection closed)")]
    PeerGone {
        /// The rank reporting.
        rank: usize,
        /// The rank that left.
        gone: usize,
    },
    /// A peer said nothing within the timeout.
    #[error("rank {rank}: rank {peer} sent nothing within {timeout:?}")]
    Timeout {
        /// The rank reporting.
        rank: usize,
        /// The silent rank.
        peer: usize,
        /// The timeout.
        timeout: Duration,
    },
    /// A peer sent something that is not this protocol.
    #[error("rank {rank}: unexpected message from rank {peer}: {line:?}")]
    Protocol {
        /// The rank reporting.
        rank: usize,
        /// The sender.
        peer: usize,
        /// What it sent.
        line: String,
    },
}

/// One connection, read line by line.
#[derive(Debug)]
struct Link {
    peer: usize,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Link {
    fn new(peer: usize, stream: TcpStream) -> std::io::Result<Link> {
        stream.set_nodelay(true)?;
        Ok(Link {
            peer,
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one line; a closed connection is the peer gone.
    fn send(&mut self, me: usize, line: &str) -> Result<(), RendezvousError> {
        let sent = self
            .writer
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.writer.flush());
        sent.map_err(|_| RendezvousError::PeerGone {
            rank: me,
            gone: self.peer,
        })
    }

    /// The next line, waiting at most until `deadline`.
    fn receive(
        &mut self,
        me: usize,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<String, RendezvousError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RendezvousError::Timeout {
                rank: me,
                peer: self.peer,
                timeout,
            });
        }
        self.receive_within(me, Some(left), timeout)
    }

    /// The next line, waiting at most `left` (`None`: until it comes or the peer is gone);
    /// `timeout` is what a timeout error reports.
    fn receive_within(
        &mut self,
        me: usize,
        left: Option<Duration>,
        timeout: Duration,
    ) -> Result<String, RendezvousError> {
        let timed_out = RendezvousError::Timeout {
            rank: me,
            peer: self.peer,
            timeout,
        };
        let gone = RendezvousError::PeerGone {
            rank: me,
            gone: self.peer,
        };
        if self.reader.get_ref().set_read_timeout(left).is_err() {
            return Err(gone);
        }
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(gone),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(timed_out)
            }
            Err(_) => Err(gone),
        }
    }
}

/// A joined rank: its links (rank 0: one per other rank; the others: one to rank 0) and the
/// bootstrap blob.
#[derive(Debug)]
pub struct Session {
    rank: usize,
    world: usize,
    timeout: Duration,
    blob: Vec<u8>,
    links: Vec<Link>,
    barriers: u64,
}

/// Rank 0's listening socket, before the ranks join.
#[derive(Debug)]
pub struct Listener {
    socket: TcpListener,
    addr: String,
}

/// Rank 0: listens on `addr` (`HOST:PORT`; port 0 picks a free one, see
/// [`Listener::local_addr`]).
pub fn listen(addr: &str) -> Result<Listener, RendezvousError> {
    let socket = TcpListener::bind(addr).map_err(|e| RendezvousError::Address {
        rank: 0,
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    Ok(Listener {
        socket,
        addr: addr.to_string(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Listener {
    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.socket.local_addr().ok()
    }

    /// Waits until ranks `1..world` have joined (at most `timeout`), then sends each `blob`.
    /// A rank that does not join in time is [`RendezvousError::JoinTimeout`] here and an `ABORT`
    /// naming it on every rank that did; a hello with a bad or repeated rank is answered with
    /// `ABORT` and ignored.
    pub fn accept_ranks(
        self,
        world: usize,
        timeout: Duration,
        blob: &[u8],
    ) -> Result<Session, RendezvousError> {
        if world == 0 {
            return Err(RendezvousError::BadRank { rank: 0, world });
        }
        let deadline = Instant::now() + timeout;
        let address = |e: std::io::Error| RendezvousError::Address {
            rank: 0,
            addr: self.addr.clone(),
            reason: e.to_string(),
        };
        self.socket.set_nonblocking(true).map_err(address)?;
        let mut joined: Vec<Option<Link>> = (0..world).map(|_| None).collect();
        while joined[1..].iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (1..world).filter(|&r| joined[r].is_none()).collect();
                let reason = format!("rank(s) {missing:?} did not join within {timeout:?}");
                for link in joined.iter_mut().flatten() {
                    let _ = link.send(0, &format!("ABORT {reason}"));
                }
                return Err(RendezvousError::JoinTimeout { missing, timeout });
            }
            match self.socket.accept() {
                Ok((stream, _)) => {
                    if let Some((rank, link)) = hello(stream, world, deadline, timeout, &joined) {
                        joined[rank] = Some(link);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(address(e)),
            }
        }
        let mut links: Vec<Link> = joined.into_iter().flatten().collect();
        let go = format!("GO {}", hex(blob));
        for link in &mut links {
            link.send(0, &go)?;
        }
        Ok(Session {
            rank: 0,
            world,
            timeout,
            blob: blob.to_vec(),
            links,
            barriers: 0,
        })
    }
}

/// Reads a joining rank's hello; `None` (after telling it why) when it is not a rank this group
/// can take.
fn hello(
    stream: TcpStream,
    world: usize,
    deadline: Instant,
    timeout: Duration,
    joined: &[Option<Link>],
) -> Option<(usize, Link)> {
    stream.set_nonblocking(false).ok()?;
    let mut link = Link::new(usize::MAX, stream).ok()?;
    let line = link.receive(0, deadline, timeout).ok()?;
    let fields: Vec<&str> = line.split(' ').collect();
    let refuse = |link: &mut Link, reason: String| {
        let _ = link.send(0, &format!("ABORT {reason}"));
        None
    };
    let (their_world, rank) = match fields.as_slice() {
        ["HELLO", w, r] => match (w.parse::<usize>(), r.parse::<usize>()) {
            (Ok(w), Ok(r)) => (w, r),
            _ => return refuse(&mut link, format!("malformed hello {line:?}")),
        },
        _ => return refuse(&mut link, format!("malformed hello {line:?}")),
    };
    if their_world != world {
        return refuse(
            &mut link,
            format!("rank {rank} says world {their_world}, rank 0 has world {world}"),
        );
    }
    if rank == 0 || rank >= world || joined[rank].is_some() {
        return refuse(
            &mut link,
            format!("rank {rank} is not a free rank of 1..{world}"),
        );
    }
    link.peer = rank;
    Some((rank, link))
}

/// Rank `rank` (1 or more): connects to rank 0 at `addr` (retrying until `timeout`), says who it
/// is, and waits for the bootstrap blob.
pub fn connect(
    addr: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<Session, RendezvousError> {
    if rank == 0 || rank >= world {
        return Err(RendezvousError::BadRank { rank, world });
    }
    let deadline = Instant::now() + timeout;
    let targets: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| RendezvousError::Address {
            rank,
            addr: addr.to_string(),
            reason: e.to_string(),
        })?
        .collect();
    let mut last = String::from("no address");
    let stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RendezvousError::NoCoordinator {
                rank,
                addr: addr.to_string(),
                timeout,
                reason: last,
            });
        }
        let attempt = targets
            .iter()
            .map(|t| TcpStream::connect_timeout(t, left.min(Duration::from_secs(1))))
            .find_map(|r| r.map_err(|e| last = e.to_string()).ok());
        match attempt {
            Some(s) => break s,
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut link = Link::new(0, stream).map_err(|_| RendezvousError::PeerGone { rank, gone: 0 })?;
    link.send(rank, &format!("HELLO {world} {rank}"))?;
    // Rank 0 was listening before this rank connected, so it answers (GO, or ABORT when a rank did
    // not join) within `timeout` from now; twice that leaves room for a loaded machine, where a
    // window ending at this rank's own deadline raced rank 0's and lost.
    let answer_within = timeout * 2;
    let line = link.receive(rank, Instant::now() + answer_within, answer_within)?;
    // An empty blob is `GO` alone (the line's trailing space is trimmed).
    let blob = match line
        .split_once(' ')
        .or((line == "GO").then_some(("GO", "")))
    {
        Some(("GO", h)) => unhex(h),
        Some(("ABORT", reason)) => {
            return Err(RendezvousError::Aborted {
                rank,
                reason: reason.to_string(),
            })
        }
        _ => None,
    };
    let blob = blob.ok_or_else(|| RendezvousError::Protocol {
        rank,
        peer: 0,
        line: line.clone(),
    })?;
    Ok(Session {
        rank,
        world,
        timeout,
        blob,
        links: vec![link],
        barriers: 0,
    })
}

impl Session {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in all.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The blob rank 0 handed out (the same on every rank).
    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    /// The timeout every wait of this session uses.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The ranks this one has a connection to: every other rank on rank 0, rank 0 on the others.
    pub fn peers(&self) -> Vec<usize> {
        self.links.iter().map(|l| l.peer).collect()
    }

    /// The connection to `peer`, or [`RendezvousError::BadRank`] when there is none.
    fn link(&mut self, peer: usize) -> Result<&mut Link, RendezvousError> {
        let world = self.world;
        self.links
            .iter_mut()
            .find(|l| l.peer == peer)
            .ok_or(RendezvousError::BadRank { rank: peer, world })
    }

    /// Sends one line (no line break inside) to `peer`, one of [`Session::peers`].
    pub fn send_to(&mut self, peer: usize, line: &str) -> Result<(), RendezvousError> {
        let me = self.rank;
        self.link(peer)?.send(me, line)
    }

    /// The next line from `peer`, waiting at most `wait` (`None`: until it comes, or the peer's
    /// connection closes).
    pub fn receive_from(
        &mut self,
        peer: usize,
        wait: Option<Duration>,
    ) -> Result<String, RendezvousError> {
        let me = self.rank;
        let timeout = wait.unwrap_or(self.timeout);
        self.link(peer)?.receive_within(me, wait, timeout)
    }

    /// The least of every rank's `value` (each rank calls it with its own; at most the timeout).
    pub fn agree_min(&mut self, value: u64) -> Result<u64, RendezvousError> {
        let (me, timeout) = (self.rank, self.timeout);
        let parse = |line: String, peer: usize| {
            line.strip_prefix("MIN ")
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(RendezvousError::Protocol {
                    rank: me,
                    peer,
                    line,
                })
        };
        if me != 0 {
            self.send_to(0, &format!("MIN {value}"))?;
            let line = self.receive_from(0, Some(timeout * 2))?;
            return parse(line, 0);
        }
        let mut least = value;
        for peer in self.peers() {
            let line = self.receive_from(peer, Some(timeout))?;
            least = least.min(parse(line, peer)?);
        }
        for peer in self.peers() {
            self.send_to(peer, &format!("MIN {least}"))?;
        }
        Ok(least)
    }

    /// The connections as plain streams, by peer, for a protocol of its own (the TCP
    /// collective); [`RendezvousError::Protocol`] when a peer already sent more than the
    /// rendezvous.
    pub fn into_streams(self) -> Result<Vec<(usize, TcpStream)>, RendezvousError> {
        let me = self.rank;
        self.links
            .into_iter()
            .map(|link| {
                if !link.reader.buffer().is_empty() {
                    let line = String::from_utf8_lossy(link.reader.buffer()).into_owned();
                    return Err(RendezvousError::Protocol {
                        rank: me,
                        peer: link.peer,
                        line,
                    });
                }
                Ok((link.peer, link.writer))
            })
            .collect()
    }

    /// Waits until every rank has reached this barrier (at most the timeout); a rank that died
    /// or stays silent fails it on every rank (see the module docs).
    pub fn barrier(&mut self) -> Result<(), RendezvousError> {
        self.barriers += 1;
        let n = self.barriers;
        let deadline = Instant::now() + self.timeout;
        let (me, timeout) = (self.rank, self.timeout);
        if me != 0 {
            let link = &mut self.links[0];
            link.send(me, &format!("BARRIER {n}"))?;
            let line = link.receive(me, deadline, timeout)?;
            return match line.split_once(' ') {
                Some(("PASS", m)) if m == n.to_string() => Ok(()),
                Some(("ABORT", reason)) => Err(RendezvousError::Aborted {
                    rank: me,
                    reason: reason.to_string(),
                }),
                _ => Err(RendezvousError::Protocol {
                    rank: me,
                    peer: 0,
                    line,
                }),
            };
        }
        let expected = format!("BARRIER {n}");
        let mut failure = None;
        for link in &mut self.links {
            match link.receive(0, deadline, timeout) {
                Ok(line) if line == expected => {}
                Ok(line) => {
                    failure = Some(RendezvousError::Protocol {
                        rank: 0,
                        peer: link.peer,
                        line,
                    })
                }
                Err(e) => failure = Some(e),
            }
            if failure.is_some() {
                break;
            }
        }
        let reply = match &failure {
            None => format!("PASS {n}"),
            Some(e) => format!("ABORT {e}"),
        };
        for link in &mut self.links {
            let _ = link.send(0, &reply);
        }
        failure.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    const SHORT: Duration = Duration::from_millis(1500);

    /// Rank 0 on a free port of 127.0.0.1, and its address.
    fn rank0() -> (Listener, String) {
        let l = listen("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    #[test]
    fn every_rank_joins_gets_the_blob_and_passes_barriers() {
        let (listener, addr) = rank0();
        let workers: Vec<_> = (1..3)
            .map(|r| {
                let addr = addr.clone();
                thread::spawn(move || {
                    let mut s = connect(&addr, r, 3, SHORT).unwrap();
                    s.barrier().unwrap();
                    s.barrier().unwrap();
                    s.blob().to_vec()
                })
            })
            .collect();
        let mut s0 = listener.accept_ranks(3, SHORT, b"unique-id").unwrap();
        s0.barrier().unwrap();
        s0.barrier().unwrap();
        for w in workers {
            assert_eq!(w.join().unwrap(), b"unique-id");
        }
        assert_eq!((s0.rank(), s0.world()), (0, 3));
    }

    #[test]
    fn every_rank_agrees_on_the_least_value_and_an_empty_blob_arrives_empty() {
        let (listener, addr) = rank0();
        let values = [7u64, 3, 9];
        let workers: Vec<_> = (1..3)
            .map(|r| {
                let addr = addr.clone();
                thread::spawn(move || {
                    let mut s = connect(&addr, r, 3, SHORT).unwrap();
                    assert!(s.blob().is_empty());
                    s.agree_min(values[r]).unwrap()
                })
            })
            .collect();
        let mut s0 = listener.accept_ranks(3, SHORT, b"").unwrap();
        assert_eq!(s0.agree_min(values[0]).unwrap(), 3);
        for w in workers {
            assert_eq!(w.join().unwrap(), 3);
        }
    }

    #[test]
    fn a_rank_that_never_joins_fails_every_rank_within_the_timeout() {
        let (listener, addr) = rank0();
        let started = Instant::now();
        let joined = thread::spawn(move || connect(&addr, 1, 3, SHORT * 2).unwrap_err());
        let e0 = listener.accept_ranks(3, SHORT, b"x").unwrap_err();
        assert_eq!(
            e0,
            RendezvousError::JoinTimeout {
                missing: vec![2],
                timeout: SHORT
            }
        );
        let e1 = joined.join().unwrap();
        assert!(
            matches!(&e1, RendezvousError::Aborted { rank: 1, reason } if reason.contains("[2]")),
            "{e1}"
        );
        assert!(started.elapsed() < SHORT * 2, "{:?}", started.elapsed());
    }

    #[test]
    fn a_rank_that_dies_after_joining_fails_the_next_barrier_everywhere() {
        let (listener, addr) = rank0();
        let survivor = {
            let addr = addr.clone();
            thread::spawn(move || {
                let mut s = connect(&addr, 1, 3, SHORT).unwrap();
                s.barrier().unwrap_err()
            })
        };
        let dying = thread::spawn(move || {
            // Joins, then its process "dies": the session is dropped, the connection closes.
            drop(connect(&addr, 2, 3, SHORT).unwrap());
        });
        let mut s0 = listener.accept_ranks(3, SHORT, b"x").unwrap();
        dying.join().unwrap();
        let started = Instant::now();
        let e0 = s0.barrier().unwrap_err();
        assert_eq!(e0, RendezvousError::PeerGone { rank: 0, gone: 2 });
        let e1 = survivor.join().unwrap();
        assert!(
            matches!(&e1, RendezvousError::Aborted { rank: 1, reason } if reason.contains("rank 2 is gone")),
            "{e1}"
        );
        assert!(started.elapsed() < SHORT, "{:?}", started.elapsed());
    }

    #[test]
    fn rank_0_dying_is_peer_gone_on_the_others() {
        let (listener, addr) = rank0();
        let worker = thread::spawn(move || {
            let mut s = connect(&addr, 1, 2, SHORT).unwrap();
            s.barrier().unwrap_err()
        });
        drop(listener.accept_ranks(2, SHORT, b"x").unwrap());
        assert_eq!(
            worker.join().unwrap(),
            RendezvousError::PeerGone { rank: 1, gone: 0 }
        );
    }

    #[test]
    fn a_silent_rank_is_a_timeout_naming_it() {
        let (listener, addr) = rank0();
        let worker = thread::spawn(move || {
            let s = connect(&addr, 1, 2, SHORT).unwrap();
            // Alive but never reaches the barrier.
            thread::sleep(SHORT + Duration::from_millis(500));
            drop(s);
        });
        let mut s0 = listener.accept_ranks(2, SHORT, b"x").unwrap();
        let e = s0.barrier().unwrap_err();
        assert_eq!(
            e,
            RendezvousError::Timeout {
                rank: 0,
                peer: 1,
                timeout: SHORT
            }
        );
        worker.join().unwrap();
    }

    #[test]
    fn no_rank_0_and_bad_ranks_are_named() {
        // A port nobody listens on: bind one, learn it, close it.
        let addr = {
            let (l, a) = rank0();
            drop(l);
            a
        };
        let e = connect(&addr, 1, 2, Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(e, RendezvousError::NoCoordinator { rank: 1, .. }),
            "{e}"
        );
        assert_eq!(
            connect(&addr, 2, 2, SHORT).unwrap_err(),
            RendezvousError::BadRank { rank: 2, world: 2 }
        );
    }
}
