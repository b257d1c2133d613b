//! Handshake frames (types `0x01..0x0F`): version and feature negotiation,
//! then mutual proof of the shared token.

/// Client's first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the client speaks.
    pub version_min: u16,
    /// Highest protocol version the client speaks.
    pub version_max: u16,
    /// Feature bits the client offers.
    pub features: u64,
    /// Client's random challenge nonce.
    pub nonce: [u8; 32],
    /// Peer name (host name or job name).
    pub peer_name: String,
    /// Software and version, for logs ("ferry 0.1.0").
    pub software: String,
}

/// Server's answer to Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version chosen for this session.
    pub version: u16,
    /// Features both sides support.
    pub features: u64,
    /// Server's random challenge nonce.
    pub nonce: [u8; 32],
    /// Server name.
    pub peer_name: String,
    /// Server software and version.
    pub software: String,
}

/// Client's proof that it holds the shared token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthProof {
    /// MAC over both nonces, keyed by the token.
    pub proof: [u8; 32],
}

/// Server accepts the client and proves it holds the token too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOk {
    /// MAC over both nonces, keyed by the token, with the server's label.
    pub proof: [u8; 32],
}
