//! Where each master's request goes, by its unit id: the routing and unit tables built
//! from the configuration ([`Tables`], swapped whole on a reload), the checks made before
//! any bus is touched (function, PDU, written addresses against the grants), agent reads
//! from the image, virtual units, and relaying to a device on its bus.
//!
//! Invariants: a request is checked in the spec's order (function 0x01, quantity and
//! length 0x03, address 0x02) before it reaches a bus; a write goes out only when the
//! unit is writable or its grants cover every address written; every request gets
//! exactly one answer ([`Answer`]), now or when its bus has answered.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::oneshot;
use tokio_modbus::{ExceptionCode, Request, Response};
use tracing::{debug, error};

use super::BROADCAST_TURNAROUND;
use super::vunit::{self, Owners, SharedVUnit, VUnit};
use crate::bus::pass::MasterId;
use crate::bus::{BusError, BusHandle, Job, Priority};
use crate::image::{Image, Raw, RawMiss};
use crate::model::{self, Model, ServeMode, WriteGrant};
use crate::point::value::Table;
use crate::serial::pdu;
use crate::server::mbap::{self, Frame};

/// Where one served unit's requests go.
struct Route {
    /// The served unit id.
    unit: u8,
    /// The declared device (agent units read its part of the image), or for a
    /// `[[server.route]]` what logs call it.
    device: Arc<str>,
    mode: ServeMode,
    /// Writes need no grant (a `[[server.route]]` with `writable = true`).
    writable: bool,
    /// Unit 0 of a `[[server.route]]` with `broadcast = true`: writes go out as a
    /// broadcast, nothing else is served.
    broadcast: bool,
    /// The device's own unit id on its bus.
    device_unit: u8,
    timeout: Duration,
    turnaround: Duration,
    retries: u8,
    bus: BusHandle,
    grants: Vec<WriteGrant>,
}

/// What the connections share.
pub(super) struct Shared {
    routes: HashMap<u8, Route>,
    /// Units answered from a register map (`[[server.unit.map]]`).
    virtuals: HashMap<u8, SharedVUnit>,
    image: Arc<Image>,
    pub(super) idle_timeout: Duration,
    /// Requests a master may have waiting or running on one bus.
    max_in_flight: usize,
}

/// The routing and unit tables every connection reads, swapped whole on a reload
/// ([`Server::tables`](super::Server::tables)): each request is served with the tables
/// current when it arrives.
#[derive(Clone)]
pub struct Tables(pub(super) Arc<std::sync::RwLock<Arc<Shared>>>);

impl Tables {
    pub(super) fn current(&self) -> Arc<Shared> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the tables with those of `config` over `buses` (as
    /// [`Server::new`](super::Server::new) builds them); the listening socket and the
    /// connections stay as they are.
    pub fn replace(
        &self,
        config: &model::Server,
        model: &Model,
        buses: &[BusHandle],
        owners: Arc<dyn Owners>,
    ) {
        let image = self.current().image.clone();
        let shared = Arc::new(Shared::new(config, model, buses, image, owners));
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = shared;
    }
}

impl Shared {
    /// The routes of `config` to `buses` and its virtual units writing through `owners`;
    /// a unit whose bus or device is missing is logged and left unserved.
    pub(super) fn new(
        config: &model::Server,
        model: &Model,
        buses: &[BusHandle],
        image: Arc<Image>,
        owners: Arc<dyn Owners>,
    ) -> Self {
        let mut routes = HashMap::new();
        for served in &config.units {
            let found = model.buses.iter().find(|b| b.name == served.bus).and_then(|bus| {
                let device = bus.devices.iter().find(|d| d.name == served.device)?;
                let handle = buses.iter().find(|h| h.name() == bus.name)?;
                Some((bus, device, handle))
            });
            let Some((bus, device, handle)) = found else {
                error!(
                    unit = served.unit,
                    bus = %served.bus,
                    device = %served.device,
                    "no such running bus or device; unit not served"
                );
                continue;
            };
            routes.insert(
                served.unit,
                Route {
                    unit: served.unit,
                    device: Arc::from(device.name.as_str()),
                    mode: served.mode,
                    writable: false,
                    broadcast: false,
                    device_unit: device.unit,
                    timeout: device.timeout,
                    turnaround: device.turnaround,
                    retries: bus.retries,
                    bus: handle.clone(),
                    grants: config.grants.iter().filter(|g| g.unit == served.unit).copied().collect(),
                },
            );
        }
        for route in &config.routes {
            let Some(handle) = buses.iter().find(|h| h.name() == route.bus) else {
                error!(bus = %route.bus, "no such running bus; route not served");
                continue;
            };
            let retries = model.buses.iter().find(|b| b.name == route.bus).map_or(0, |b| b.retries);
            let broadcast = route.broadcast.then_some(0);
            for unit in route.units.iter().copied().chain(broadcast) {
                let device_unit = if unit == 0 { 0 } else { route.bus_unit(unit) };
                routes.insert(
                    unit,
                    Route {
                        unit,
                        device: Arc::from(format!("{} unit {device_unit}", route.bus)),
                        mode: ServeMode::Pass,
                        writable: route.writable,
                        broadcast: unit == 0,
                        device_unit,
                        timeout: route.timeout,
                        turnaround: if unit == 0 {
                            route.turnaround.max(BROADCAST_TURNAROUND)
                        } else {
                            route.turnaround
                        },
                        retries,
                        bus: handle.clone(),
                        grants: config.grants.iter().filter(|g| g.unit == unit).copied().collect(),
                    },
                );
            }
        }
        let virtuals = config
            .virtual_units
            .iter()
            .map(|v| {
                let grants = config.grants.iter().filter(|g| g.unit == v.unit).copied().collect();
                (v.unit, Arc::new(VUnit::new(v.clone(), owners.clone(), grants)))
            })
            .collect();
        Shared {
            routes,
            virtuals,
            image,
            idle_timeout: config.idle_timeout,
            max_in_flight: config.max_in_flight,
        }
    }
}

/// What to send for one request.
pub(super) enum Answer {
    Now(Frame),
    Later(BoxFuture<'static, Frame>),
}

/// The coils/registers a write request changes: table, first address, count.
fn write_span(req: &Request<'_>) -> Option<(Table, u16, usize)> {
    Some(match req {
        Request::WriteSingleCoil(a, _) => (Table::Coils, *a, 1),
        Request::WriteMultipleCoils(a, bits) => (Table::Coils, *a, bits.len()),
        Request::WriteSingleRegister(a, _) | Request::MaskWriteRegister(a, _, _) => (Table::Holding, *a, 1),
        Request::WriteMultipleRegisters(a, words) | Request::ReadWriteMultipleRegisters(_, _, a, words) => {
            (Table::Holding, *a, words.len())
        }
        _ => return None,
    })
}

/// The exception a master gets for a bus outcome that is not a response.
fn exception_for(e: &BusError) -> ExceptionCode {
    match e {
        BusError::Exception(code) => *code,
        BusError::Timeout { .. } => ExceptionCode::GatewayTargetDevice,
        BusError::QueueFull => ExceptionCode::ServerDeviceBusy,
        BusError::PortDown(_) | BusError::Closed => ExceptionCode::GatewayPathUnavailable,
        BusError::Invalid(_) => ExceptionCode::IllegalDataValue,
    }
}

/// Function codes that write (FC23 included: it writes before it reads).
fn is_write(function: u8) -> bool {
    matches!(function, 5 | 6 | 15 | 16 | 22 | 23)
}

impl Route {
    /// Whether the unit offers `function` at all: the spec's first check (0x01), made
    /// before the PDU is judged (0x03, then 0x02). Writing is a function only a unit with
    /// grants offers; an agent unit reads FC1-4 and nothing else; a pass unit offers what
    /// its device offers (the device judges).
    fn serves(&self, function: u8) -> bool {
        if self.broadcast {
            return matches!(function, 5 | 6 | 15 | 16);
        }
        if is_write(function) {
            return self.writable || !self.grants.is_empty();
        }
        match self.mode {
            ServeMode::Pass => true,
            ServeMode::Agent { .. } => matches!(function, 1..=4),
        }
    }

    /// `Ok` when grants cover every address of the write.
    fn may_write(&self, table: Table, start: u16, count: usize) -> Result<(), ExceptionCode> {
        if self.writable {
            return Ok(());
        }
        let covered = (usize::from(start)..usize::from(start) + count).all(|a| {
            u16::try_from(a).is_ok_and(|a| self.grants.iter().any(|g| g.covers(self.unit, table, a)))
        });
        if covered { Ok(()) } else { Err(ExceptionCode::IllegalDataAddress) }
    }
}

impl Shared {
    pub(super) fn handle(&self, master: MasterId, frame: Frame) -> Answer {
        if let Some(v) = self.virtuals.get(&frame.unit) {
            return self.virtual_unit(v, frame);
        }
        let Some(route) = self.routes.get(&frame.unit) else {
            return Answer::Now(frame.exception(ExceptionCode::GatewayPathUnavailable));
        };
        // The spec's order: function (0x01), then quantity and length (0x03), then
        // address (0x02), then execution.
        if !frame.pdu.first().is_some_and(|f| route.serves(*f)) {
            return Answer::Now(frame.exception(ExceptionCode::IllegalFunction));
        }
        let request = match mbap::decode_request(&frame.pdu) {
            Ok(r) => r,
            Err(code) => return Answer::Now(frame.exception(code)),
        };
        if let Some((table, start, count)) = write_span(&request) {
            if let Err(code) = route.may_write(table, start, count) {
                debug!(unit = frame.unit, ?table, start, count, "write refused");
                return Answer::Now(frame.exception(code));
            }
            return relay(route, master, frame, request, self.max_in_flight);
        }
        match route.mode {
            ServeMode::Pass => relay(route, master, frame, request, self.max_in_flight),
            ServeMode::Agent { max_age } => Answer::Now(self.agent_read(route, &frame, &request, max_age)),
        }
    }

    /// Answers a request to a virtual unit: reads now, writes once carried out.
    fn virtual_unit(&self, v: &SharedVUnit, frame: Frame) -> Answer {
        if !frame.pdu.first().is_some_and(|f| v.serves(*f)) {
            return Answer::Now(frame.exception(ExceptionCode::IllegalFunction));
        }
        let request = match mbap::decode_request(&frame.pdu) {
            Ok(r) => r,
            Err(code) => return Answer::Now(frame.exception(code)),
        };
        let encode = |frame: &Frame, rsp: &Response| {
            let mut pdu = Vec::with_capacity(pdu::MAX_PDU);
            pdu::encode_response(rsp, &mut pdu);
            frame.answer(pdu)
        };
        let Some(response) = vunit::write_response(&request) else {
            return Answer::Now(match v.read(&self.image, &request) {
                Ok(rsp) => encode(&frame, &rsp),
                Err(code) => frame.exception(code),
            });
        };
        let planned = match v.plan_write(&request) {
            Ok(p) => p,
            Err(code) => return Answer::Now(frame.exception(code)),
        };
        let v = v.clone();
        Answer::Later(Box::pin(async move {
            match v.write(planned).await {
                Ok(()) => encode(&frame, &response),
                Err(code) => frame.exception(code),
            }
        }))
    }

    /// Answers a read from the raw cache of the image.
    fn agent_read(&self, route: &Route, frame: &Frame, req: &Request<'_>, max_age: Duration) -> Frame {
        let (table, start, count) = match req {
            Request::ReadCoils(a, q) => (Table::Coils, *a, *q),
            Request::ReadDiscreteInputs(a, q) => (Table::Discrete, *a, *q),
            Request::ReadHoldingRegisters(a, q) => (Table::Holding, *a, *q),
            Request::ReadInputRegisters(a, q) => (Table::Input, *a, *q),
            _ => return frame.exception(ExceptionCode::IllegalFunction),
        };
        let rsp = match self.image.read_raw(&route.device, table, start, count, max_age) {
            Ok(Raw::Bits(b)) if table == Table::Coils => Response::ReadCoils(b),
            Ok(Raw::Bits(b)) => Response::ReadDiscreteInputs(b),
            Ok(Raw::Words(w)) if table == Table::Holding => Response::ReadHoldingRegisters(w),
            Ok(Raw::Words(w)) => Response::ReadInputRegisters(w),
            Err(RawMiss::NotPolled) => return frame.exception(ExceptionCode::IllegalDataAddress),
            Err(RawMiss::NotFresh) => return frame.exception(ExceptionCode::GatewayTargetDevice),
        };
        let mut pdu = Vec::with_capacity(pdu::MAX_PDU);
        pdu::encode_response(&rsp, &mut pdu);
        frame.answer(pdu)
    }
}

/// Queues a request for the route's device on its bus; the answer comes later.
fn relay(
    route: &Route,
    master: MasterId,
    frame: Frame,
    request: Request<'static>,
    max_in_flight: usize,
) -> Answer {
    // Bit replies are padded to whole bytes; answer exactly the bits asked for.
    let bits = match request {
        Request::ReadCoils(_, q) | Request::ReadDiscreteInputs(_, q) => usize::from(q),
        _ => usize::MAX,
    };
    let (reply, rx) = oneshot::channel();
    let job = Job {
        unit: route.device_unit,
        request,
        priority: Priority::PassThrough,
        timeout: route.timeout,
        turnaround: route.turnaround,
        retries: route.retries,
        reply,
    };
    if let Err(e) = route.bus.pass_through(master, job, max_in_flight) {
        return Answer::Now(frame.exception(exception_for(&e)));
    }
    Answer::Later(Box::pin(async move {
        match rx.await.unwrap_or(Err(BusError::Closed)) {
            Ok(mut rsp) => {
                if let Response::ReadCoils(b) | Response::ReadDiscreteInputs(b) = &mut rsp {
                    b.truncate(bits);
                }
                let mut pdu = Vec::with_capacity(pdu::MAX_PDU);
                pdu::encode_response(&rsp, &mut pdu);
                frame.answer(pdu)
            }
            Err(e) => frame.exception(exception_for(&e)),
        }
    }))
}
