//! Types every service shares: machine ids, tags, power states and job statuses.

mod job_status;
mod machine_id;
mod power;
mod tag;

pub use job_status::JobStatus;
pub use machine_id::{InvalidMachineId, MachineId};
pub use power::{InvalidPowerState, PowerState};
pub use tag::{InvalidTag, Tag};
