//! Connecting and the handshake: the greeting, client flags, options
//! (structured replies, metadata contexts, NBD_OPT_GO or EXPORT_NAME) and
//! their replies, up to the transmission phase.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;

use super::transport::{parse_uri, Endpoint, RecvBuf, Stream};
use super::{map_io, NbdClient, NbdOptions, MAX_NEGOTIATION_MESSAGE};
use crate::proto::{self, info, opt, rep, BlockSizes, Greeting, InfoReply, OptionReply, OptionRequest};
use crate::NbdError;

impl NbdClient {
    /// Connects to `uri` and negotiates per `opts`.
    pub fn connect(uri: &str, opts: NbdOptions) -> Result<NbdClient, NbdError> {
        let (endpoint, export) = parse_uri(uri)?;
        let timeout = (!opts.timeout.is_zero()).then_some(opts.timeout);
        let (stream, target) = match &endpoint {
            Endpoint::Tcp { host, port } => {
                let target = format!("{host}:{port}");
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| NbdError::Connect { target: target.clone(), source: e })?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "host resolved to no address");
                let mut stream = None;
                for a in addrs {
                    let r = match timeout {
                        Some(t) => TcpStream::connect_timeout(&a, t),
                        None => TcpStream::connect(a),
                    };
                    match r {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = stream.ok_or(NbdError::Connect { target: target.clone(), source: last })?;
                s.set_nodelay(true).map_err(|e| NbdError::Connect { target: target.clone(), source: e })?;
                (Stream::Tcp(s), target)
            }
            Endpoint::Unix { path } => {
                let s = UnixStream::connect(path).map_err(|e| NbdError::Connect { target: path.clone(), source: e })?;
                (Stream::Unix(s), path.clone())
            }
        };
        stream.set_timeouts(timeout).map_err(|e| NbdError::Connect { target: target.clone(), source: e })?;
        let mut c = NbdClient {
            stream,
            rbuf: RecvBuf::new(),
            sbuf: Vec::with_capacity(4096),
            target,
            export,
            size: 0,
            tflags: 0,
            block_sizes: BlockSizes::default(),
            structured: false,
            contexts: Vec::new(),
            opts,
            next_handle: 1,
            pending: HashMap::new(),
            done: HashMap::new(),
            ready: VecDeque::new(),
            owned_reads: 0,
            detached: VecDeque::new(),
            detached_in_flight: 0,
            broken: None,
        };
        match c.negotiate() {
            Ok(()) => Ok(c),
            Err(e) => {
                // Soft disconnect where the stream is still in sync.
                if matches!(e, NbdError::OptionRejected { .. } | NbdError::MetaContextUnavailable(_)) {
                    let mut b = Vec::new();
                    if OptionRequest::Abort.encode(&mut b).is_ok() {
                        let _ = c.stream.write_all(&b);
                    }
                }
                c.broken = Some(e.to_string());
                c.stream.shutdown();
                Err(e)
            }
        }
    }

    fn io_err(&self, e: io::Error, op: impl FnOnce() -> String) -> NbdError {
        map_io(e, op, self.opts.timeout)
    }

    /// Receives one negotiation message with `decode`.
    fn recv_decoded<T>(
        &mut self,
        op: &str,
        mut decode: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, NbdError>,
    ) -> Result<T, NbdError> {
        loop {
            if let Some((v, n)) = decode(self.rbuf.data())? {
                self.rbuf.consume(n);
                return Ok(v);
            }
            if let Err(e) = self.rbuf.fill_more(&mut self.stream, MAX_NEGOTIATION_MESSAGE) {
                return Err(self.io_err(e, || format!("{op} (from {})", self.target)));
            }
        }
    }

    fn send_option(&mut self, o: &OptionRequest) -> Result<(), NbdError> {
        let mut b = Vec::new();
        o.encode(&mut b)?;
        self.stream
            .write_all(&b)
            .map_err(|e| map_io(e, || format!("sending {}", proto::option_name(o.code())), self.opts.timeout))
    }

    fn recv_option_reply(&mut self, option: u32) -> Result<OptionReply, NbdError> {
        let what = format!("waiting for the reply to {}", proto::option_name(option));
        self.recv_decoded(&what, |b| proto::decode_option_reply(b, option))
    }

    fn rejected(option: u32, code: u32, message: String) -> NbdError {
        NbdError::OptionRejected {
            option: proto::option_name(option),
            code,
            code_name: proto::option_error_name(code),
            message,
        }
    }

    fn negotiate(&mut self) -> Result<(), NbdError> {
        let greeting = self.recv_decoded("waiting for the server greeting", Greeting::decode)?;
        let cflags = greeting.client_flags();
        self.stream
            .write_all(&proto::encode_client_flags(cflags))
            .map_err(|e| map_io(e, || "sending client flags".into(), self.opts.timeout))?;

        if self.opts.structured_replies {
            self.send_option(&OptionRequest::StructuredReply)?;
            match self.recv_option_reply(opt::STRUCTURED_REPLY)? {
                OptionReply::Ack => self.structured = true,
                OptionReply::Error { code: rep::ERR_UNSUP | rep::ERR_POLICY, .. } => {}
                OptionReply::Error { code, message } => {
                    return Err(Self::rejected(opt::STRUCTURED_REPLY, code, message))
                }
                other => {
                    return Err(NbdError::BadHandshake(format!(
                        "unexpected reply to NBD_OPT_STRUCTURED_REPLY: {other:?}"
                    )))
                }
            }
        }

        if !self.opts.meta_contexts.is_empty() {
            if !self.structured {
                return Err(NbdError::Unsupported(
                    "metadata contexts need structured replies, which the server refused".into(),
                ));
            }
            let queries = self.opts.meta_contexts.clone();
            self.send_option(&OptionRequest::SetMetaContext { export: self.export.clone(), queries: queries.clone() })?;
            loop {
                match self.recv_option_reply(opt::SET_META_CONTEXT)? {
                    OptionReply::MetaContext { id, name } => {
                        if self.contexts.len() >= 1024 {
                            return Err(NbdError::BadHandshake("more than 1024 metadata contexts".into()));
                        }
                        self.contexts.push((name, id));
                    }
                    OptionReply::Ack => break,
                    OptionReply::Error { code, message } => {
                        return Err(Self::rejected(opt::SET_META_CONTEXT, code, message))
                    }
                    other => {
                        return Err(NbdError::BadHandshake(format!(
                            "unexpected reply to NBD_OPT_SET_META_CONTEXT: {other:?}"
                        )))
                    }
                }
            }
            for q in &queries {
                if !self.contexts.iter().any(|(n, _)| n == q) {
                    return Err(NbdError::MetaContextUnavailable(q.clone()));
                }
            }
        }

        self.send_option(&OptionRequest::Go { export: self.export.clone(), requests: vec![info::BLOCK_SIZE] })?;
        let mut export_info = None;
        loop {
            match self.recv_option_reply(opt::GO)? {
                OptionReply::Info(InfoReply::Export { size, flags }) => export_info = Some((size, flags)),
                OptionReply::Info(InfoReply::BlockSize(bs)) => self.block_sizes = bs,
                OptionReply::Info(_) => {}
                OptionReply::Ack => break,
                OptionReply::Error { code: rep::ERR_UNSUP, .. } if self.contexts.is_empty() => {
                    // An old server: NBD_OPT_EXPORT_NAME cannot report errors but works.
                    self.send_option(&OptionRequest::ExportName { export: self.export.clone() })?;
                    let no_zeroes = cflags & proto::FLAG_C_NO_ZEROES != 0;
                    let (size, flags) = self.recv_decoded("waiting for the NBD_OPT_EXPORT_NAME reply", |b| {
                        Ok(proto::decode_export_name_reply(b, no_zeroes))
                    })?;
                    export_info = Some((size, flags));
                    break;
                }
                OptionReply::Error { code, message } => {
                    let message = if message.is_empty() { format!("export {:?}", self.export) } else { message };
                    return Err(Self::rejected(opt::GO, code, message));
                }
                other => return Err(NbdError::BadHandshake(format!("unexpected reply to NBD_OPT_GO: {other:?}"))),
            }
        }
        let (size, flags) =
            export_info.ok_or_else(|| NbdError::BadHandshake("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()))?;
        if size > i64::MAX as u64 {
            return Err(NbdError::BadHandshake(format!("export size {size} is too large")));
        }
        self.size = size;
        self.tflags = flags;
        Ok(())
    }
}
