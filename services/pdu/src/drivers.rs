//! Every driver the service can build, by name. Adding a driver family is one line here.

use dutgate_pdu_driver::Registry;

pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(dutgate_pdu_dummy::factories());
    r.register(dutgate_pdu_snmp::factories());
    r.register(dutgate_pdu_mqtt::factories());
    r.register(dutgate_pdu_http::factories());
    r.register(dutgate_pdu_command::factories());
    r.register(dutgate_pdu_virtual::factories());
    r
}
