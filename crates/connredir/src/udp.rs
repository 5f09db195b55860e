//! UDP flows, seen from a service.
//!
//! UDP has no `accept()`. A service receives a client's first datagram on
//! its socket bound to the service address, then opens a socket of its own
//! for that client: bound to the same address (`SO_REUSEADDR`,
//! `SO_REUSEPORT`) and connected to the client's address ([`UdpFlow::open`]).
//! Its `connect()` is where the layer finds the client's flow; from then on
//! that socket answers [`query_records`](crate::query_records),
//! [`query_context`](crate::query_context) and
//! [`original_destination`](crate::original_destination) as an accepted TCP
//! socket does, and receives the client's later datagrams. The onward
//! socket gets the records before it connects or first sends
//! ([`UdpFlow::connect_onward`]), and the chain goes on as for TCP.

use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Socket, Type};

use crate::{Error, RedirectContext, RedirectRecords};

/// A service's socket for one client's UDP flow.
#[derive(Debug)]
pub struct UdpFlow {
    socket: UdpSocket,
    client: SocketAddr,
}

impl UdpFlow {
    /// Opens the service's socket for `client`: bound to `service` (the
    /// service's registered address, where the client's datagram arrived)
    /// with `SO_REUSEADDR` and `SO_REUSEPORT`, and connected to `client`.
    /// The socket that received the first datagram must have been bound
    /// with `SO_REUSEADDR` and `SO_REUSEPORT` too, by the same user.
    pub fn open(service: SocketAddr, client: SocketAddr) -> Result<UdpFlow, Error> {
        let socket =
            Socket::new(Domain::for_address(service), Type::DGRAM, None).map_err(Error::Io)?;
        socket.set_reuse_address(true).map_err(Error::Io)?;
        socket.set_reuse_port(true).map_err(Error::Io)?;
        socket.bind(&service.into()).map_err(Error::Io)?;
        socket.connect(&client.into()).map_err(Error::Io)?;
        Ok(UdpFlow {
            socket: socket.into(),
            client,
        })
    }

    /// The socket connected to the client: read the client's datagrams and
    /// answer them here.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The socket, for the caller to keep.
    pub fn into_socket(self) -> UdpSocket {
        self.socket
    }

    /// The client's address.
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// The flow's redirect records.
    pub fn records(&self) -> Result<RedirectRecords, Error> {
        crate::query_records(&self.socket)
    }

    /// The flow's redirect context (for the service that redirected it).
    pub fn context(&self) -> Result<RedirectContext, Error> {
        crate::query_context(&self.socket)
    }

    /// Where the client sent the flow.
    pub fn original_destination(&self) -> Result<SocketAddr, Error> {
        crate::original_destination(&self.socket)
    }

    /// A UDP socket to `destination` that carries the flow's records (when
    /// it has any), connected: its datagrams meet the next service, or the
    /// destination, never this service again.
    pub fn connect_onward(&self, destination: SocketAddr) -> Result<UdpSocket, Error> {
        let onward =
            Socket::new(Domain::for_address(destination), Type::DGRAM, None).map_err(Error::Io)?;
        match self.records() {
            Ok(records) => crate::set_records(&onward, &records)?,
            Err(Error::NotRedirected) => {}
            Err(e) => return Err(e),
        }
        onward.connect(&destination.into()).map_err(Error::Io)?;
        Ok(onward.into())
    }
}
