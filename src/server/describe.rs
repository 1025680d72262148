//! What `check` shows of the server and of its virtual units, in words: where it listens,
//! the units it serves and the routes (unit ids as ranges), and each virtual unit's
//! register map.
//!
//! Invariants: read-only over the validated model; one line per unit, route or point.

use crate::model::{self, ServeMode};

/// What `check` shows for a virtual unit: its register map, one line per point
/// (address, table, type, order, scale, point, engineering unit), then the status block.
pub fn describe(v: &model::VirtualUnit) -> String {
    let mut out = format!(
        "virtual unit {} ({} point(s), on_bad {}):\n",
        v.unit,
        v.targets.len(),
        if v.on_bad == model::OnBad::Last { "last" } else { "exception" }
    );
    for t in &v.targets {
        let end = u32::from(t.address) + u32::from(t.width()) - 1;
        out.push_str(&format!(
            "  {:<8} {:>5}..={:<5} {:<10} {} scale {} offset {}  {}{}\n",
            format!("{:?}", t.table).to_lowercase(),
            t.address,
            end,
            t.data_type.to_string(),
            format!("{:?}", t.order).to_lowercase(),
            t.scale,
            t.offset,
            t.point,
            t.eng_unit.as_deref().map(|u| format!(" [{u}]")).unwrap_or_default()
        ));
    }
    if let Some(s) = v.status {
        out.push_str(&format!(
            "  input    {s:>5}..={:<5} status: heartbeat, link bits ({}), point quality bits\n",
            u32::from(s) + u32::from(v.status_len()) - 1,
            v.peers().join(", ")
        ));
    }
    out
}

/// What `check` shows of the server: where it listens, the units it serves and the
/// routes, in words.
pub fn describe_server(config: &model::Server) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "server on {} (at most {} masters, {} pass-through request(s) each per bus)\n",
        config.listen, config.max_connections, config.max_in_flight
    );
    let grants = |unit: u8| config.grants.iter().filter(|g| g.unit == unit).count();
    for u in &config.units {
        let how = match u.mode {
            ServeMode::Agent { max_age } => format!("agent for {} (values up to {max_age:?} old)", u.device),
            ServeMode::Pass => format!("passed through to {} on bus {}", u.device, u.bus),
        };
        let _ = writeln!(out, "  unit {}: {how}, {} write grant(s)", u.unit, grants(u.unit));
    }
    for r in &config.routes {
        let to = match r.unit_offset {
            0 => "the same unit ids".to_owned(),
            o if o > 0 => format!("unit id - {o}"),
            o => format!("unit id + {}", -o),
        };
        let writes = if r.writable {
            "writable".to_owned()
        } else {
            let n: usize = r.units.iter().map(|u| grants(*u)).sum();
            if n == 0 { "read-only".to_owned() } else { format!("{n} write grant(s)") }
        };
        let _ = writeln!(
            out,
            "  units {} ({} ids) routed to bus {} as {to}, {writes}, timeout {:?}",
            ranges(&r.units),
            r.units.len(),
            r.bus,
            r.timeout
        );
        if r.broadcast {
            let _ = writeln!(
                out,
                "  unit 0: writes (FC5/6/15/16) broadcast on bus {}, answered with their echo",
                r.bus
            );
        }
    }
    out
}

/// `[1, 2, 3, 7]` as `"1-3,7"`.
fn ranges(units: &[u8]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < units.len() {
        let mut j = i;
        while j + 1 < units.len() && units[j + 1] == units[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { units[i].to_string() } else { format!("{}-{}", units[i], units[j]) });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_ranges_read_as_written() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), "1-3,7,9-10");
        assert_eq!(ranges(&[5]), "5");
        assert_eq!(ranges(&[]), "");
    }
}
