//! The simulations the Modbus-TCP tests share (the server's masters and the
//! `modbus-tcp://` bus read the same devices), written once.

/// Unit 1, a boiler: holding 0..=3 = 100..=103, coils 0..=2 = 1, 0, 1. Unit 2, a meter:
/// 130 holding registers (register i = 1000 + i), input 0..=1 = 7, 8, 2000 coils (every
/// third on) and discrete 0..=2 = 1, 1, 0. Unit 3: silent. (The gateways of the tests poll
/// unit 1 often and unit 2 once an hour, so the requests unit 2 sees are the masters'.)
pub fn boiler_meter_dead() -> String {
    let words: Vec<String> = (0..130).map(|i| (1000 + i).to_string()).collect();
    let coils: Vec<&str> = (0..2000).map(|i| if i % 3 == 0 { "1" } else { "0" }).collect();
    format!(
        r#"
[[unit]]
unit = 1
[[unit.register]]
table = "holding"
address = 0
values = [100, 101, 102, 103]
[[unit.register]]
table = "coils"
address = 0
values = [1, 0, 1]

[[unit]]
unit = 2
[[unit.register]]
table = "holding"
address = 0
values = [{}]
[[unit.register]]
table = "input"
address = 0
values = [7, 8]
[[unit.register]]
table = "coils"
address = 0
values = [{}]
[[unit.register]]
table = "discrete"
address = 0
values = [1, 1, 0]

[[unit]]
unit = 3
fault = "silent"
[[unit.register]]
table = "holding"
address = 0
values = [0]
"#,
        words.join(", "),
        coils.join(", ")
    )
}
