//! What `check` tells about register maps beyond the polling plan: the tag list of each
//! virtual unit as CSV (`check --map-csv DIR`, ready to import into a SCADA), and which
//! received points each `[[plc.map]]` and `[[server.unit.map]]` expects, with a warning
//! for the ones no configured `[[peer]]` is named after.
//!
//! Invariants: one CSV file per virtual unit, named `unit-<id>.csv`, holding a header row
//! and one row per target in map order, then one row per status register; fields are
//! quoted as RFC 4180 says (by the `csv` crate) and lines end in CRLF. Nothing here
//! reads the network or a device.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::model::{MapTarget, Model, VirtualUnit};

/// The header row of a tag list.
pub const CSV_HEADER: [&str; 10] =
    ["address", "registers", "table", "type", "order", "scale", "offset", "point", "eng_unit", "description"];

/// Why a tag list cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The directory cannot be created or a file in it written.
    #[error("cannot write the tag list {path}: {source}")]
    Write {
        /// The file (or directory).
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The rows of one virtual unit's tag list (header not included): the targets in map
/// order, then the status block's registers.
pub fn tag_rows(v: &VirtualUnit) -> Vec<[String; 10]> {
    let mut rows: Vec<[String; 10]> = v
        .targets
        .iter()
        .map(|t| {
            let description = match t.received() {
                Some((peer, _)) => format!("received from {peer}"),
                None => "local point".to_owned(),
            };
            [
                t.address.to_string(),
                t.width().to_string(),
                t.table.to_string(),
                t.data_type.to_string(),
                format!("{:?}", t.order).to_lowercase(),
                t.scale.to_string(),
                t.offset.to_string(),
                t.point.clone(),
                t.eng_unit.clone().unwrap_or_default(),
                description,
            ]
        })
        .collect();
    if let Some(s) = v.status {
        let status = |offset: u16, point: String, description: String| {
            [
                (u32::from(s) + u32::from(offset)).to_string(),
                "1".to_owned(),
                crate::point::value::Table::Input.to_string(),
                crate::point::value::DataType::U16.to_string(),
                crate::point::value::WordOrder::Abcd.to_string(),
                "1".to_owned(),
                "0".to_owned(),
                point,
                String::new(),
                description,
            ]
        };
        rows.push(status(0, "status.heartbeat".into(), "seconds since start, wraps at 65535".into()));
        let links: Vec<String> = v.peers().iter().enumerate().map(|(i, p)| format!("bit {i}: {p}")).collect();
        rows.push(status(
            1,
            "status.links".into(),
            if links.is_empty() {
                "link bits (no peer)".into()
            } else {
                format!("link up bits; {}", links.join(", "))
            },
        ));
        for (r, chunk) in v.targets.chunks(16).enumerate() {
            let bits: Vec<String> =
                chunk.iter().enumerate().map(|(b, t)| format!("bit {b}: {}", t.point)).collect();
            let offset = 2 + u16::try_from(r).unwrap_or(u16::MAX - 2);
            rows.push(status(
                offset,
                format!("status.quality.{r}"),
                format!("good bits; {}", bits.join(", ")),
            ));
        }
    }
    rows
}

/// One virtual unit's tag list as CSV text (RFC 4180, CRLF line ends).
pub fn tag_list_csv(v: &VirtualUnit) -> String {
    let mut w = csv::WriterBuilder::new().terminator(csv::Terminator::CRLF).from_writer(Vec::new());
    // Writing into a Vec cannot fail, and every row has the header's width.
    let _ = w.write_record(CSV_HEADER);
    for row in tag_rows(v) {
        let _ = w.write_record(&row);
    }
    let bytes = w.into_inner().unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

/// Writes `unit-<id>.csv` for every virtual unit of `model` into `dir` (created if
/// missing); returns the files written, in unit order.
pub fn write_tag_lists(model: &Model, dir: &Path) -> Result<Vec<PathBuf>, MapsError> {
    std::fs::create_dir_all(dir).map_err(|source| MapsError::Write { path: dir.to_owned(), source })?;
    let mut written = Vec::new();
    for v in model.server.iter().flat_map(|s| &s.virtual_units) {
        let path = dir.join(format!("unit-{}.csv", v.unit));
        std::fs::write(&path, tag_list_csv(v))
            .map_err(|source| MapsError::Write { path: path.clone(), source })?;
        written.push(path);
    }
    Ok(written)
}

/// For each PLC and virtual unit that maps received points: a line per peer naming the
/// points it expects from it; for each peer name no `[[peer]]` is configured for (its
/// points arrive only if a hub relays them under that origin), a `note:` naming the hubs
/// whose `accept_relayed` lists it, or a `warning:` when none does (they never arrive).
pub fn describe_received(model: &Model) -> String {
    let all = || model.links.iter().flat_map(|l| &l.peers);
    let peers: Vec<&str> = all().map(|p| p.name.as_str()).collect();
    let mut out = String::new();
    let mut one = |what: String, targets: &mut dyn Iterator<Item = &MapTarget>| {
        let mut by_peer: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (peer, point) in targets.filter_map(MapTarget::received) {
            let list = by_peer.entry(peer).or_default();
            if !list.contains(&point) {
                list.push(point);
            }
        }
        for (peer, points) in by_peer {
            out.push_str(&format!("{what} expects from {peer}: {}\n", points.join(", ")));
            if !peers.contains(&peer) {
                let hubs: Vec<&str> =
                    all().filter(|p| p.accept_relayed.is_match(peer)).map(|p| p.name.as_str()).collect();
                if hubs.is_empty() {
                    out.push_str(&format!(
                        "warning: {what} expects points from {peer:?}, but no [[peer]] is named {peer:?} \
                         and no [[peer]]'s accept_relayed lists it: they never arrive (a hub relaying them \
                         needs \"{peer}\" in the accept_relayed of its [[peer]])\n"
                    ));
                } else {
                    out.push_str(&format!(
                        "note: {what} expects points from {peer:?} relayed by {} (accept_relayed)\n",
                        hubs.join(" or ")
                    ));
                }
            }
        }
    };
    for p in &model.plcs {
        one(format!("plc {:?}", p.name), &mut p.map.iter().flat_map(|m| &m.targets));
    }
    for v in model.server.iter().flat_map(|s| &s.virtual_units) {
        one(format!("virtual unit {}", v.unit), &mut v.targets.iter());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_points_of_an_origin_no_hub_may_relay_are_warned_about() {
        const FP: &str =
            "3F:A2:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:01:23:45:67:89:AB:CD:EF:10:32:54:76:98:9C";
        let text = format!(
            "[gateway]\nname = \"site-c\"\n[link]\nidentity = \"id\"\ndata_dir = \"data\"\n\
             listen = \"127.0.0.1:7700\"\n[[peer]]\nname = \"hub-b\"\nfingerprint = \"{FP}\"\n\
             accept_relayed = [\"line-*\"]\n[[plc]]\nname = \"p\"\naddress = \"127.0.0.1:502\"\n\
             [[plc.map]]\npoints = [\"line-3/x\", \"site-x/y\"]\ntable = \"holding\"\naddress = 0\ntype = \"u16\"\n"
        );
        let model = crate::config::parse(&text, "c.toml").expect("config");
        let out = describe_received(&model);
        assert!(
            out.contains("note: plc \"p\" expects points from \"line-3\" relayed by hub-b (accept_relayed)"),
            "{out}"
        );
        assert!(
            out.contains("warning: plc \"p\" expects points from \"site-x\", but no [[peer]] is named \"site-x\" and no [[peer]]'s accept_relayed lists it"),
            "{out}"
        );
        assert!(!out.contains("warning: plc \"p\" expects points from \"line-3\""), "{out}");
    }
    use crate::model::OnBad;
    use crate::point::value::Table;
    use crate::point::value::{DataType, WordOrder};

    fn target(point: &str, table: Table, address: u16, data_type: DataType, unit: Option<&str>) -> MapTarget {
        MapTarget {
            point: point.into(),
            table,
            address,
            data_type,
            order: WordOrder::Cdab,
            scale: 0.1,
            offset: 0.0,
            eng_unit: unit.map(Into::into),
        }
    }

    #[test]
    fn tag_list_quotes_as_rfc_4180_and_lists_the_status_block() {
        let v = VirtualUnit {
            unit: 10,
            targets: vec![
                target("site-a/boiler.flow_temp", Table::Holding, 0, DataType::F32, Some("degC")),
                target("site-a/boiler.note", Table::Holding, 2, DataType::Str(4), Some("a \"quoted\", unit")),
                target("pump.running", Table::Discrete, 0, DataType::Bool, None),
            ],
            on_bad: OnBad::Exception,
            status: Some(100),
        };
        let text = tag_list_csv(&v);
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines[0], "address,registers,table,type,order,scale,offset,point,eng_unit,description");
        assert_eq!(lines[1], "0,2,holding,f32,cdab,0.1,0,site-a/boiler.flow_temp,degC,received from site-a");
        assert_eq!(
            lines[2],
            "2,2,holding,string(4),cdab,0.1,0,site-a/boiler.note,\"a \"\"quoted\"\", unit\",received from site-a"
        );
        assert_eq!(lines[3], "0,1,discrete,bool,cdab,0.1,0,pump.running,,local point");
        assert_eq!(
            lines[4],
            "100,1,input,u16,abcd,1,0,status.heartbeat,,\"seconds since start, wraps at 65535\""
        );
        assert_eq!(lines[5], "101,1,input,u16,abcd,1,0,status.links,,link up bits; bit 0: site-a");
        assert!(lines[6].starts_with(
            "102,1,input,u16,abcd,1,0,status.quality.0,,\"good bits; bit 0: site-a/boiler.flow_temp,"
        ));
        assert_eq!(lines[7], "", "CRLF after the last row");
        assert_eq!(lines.len(), 8);
    }
}
