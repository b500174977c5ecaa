//! `reimagectl scheduling disable|enable`.

use crate::node_cmd;
use crate::output::Format;
use anyhow::Context;
use reimage_protocol::Client;
use reimage_protocol::api::DisableSchedulingOption;

/// Whether the node takes new tasks.
#[derive(Debug, clap::Subcommand)]
pub enum SchedulingCommand {
    /// Take no new tasks; prints the node afterwards.
    Disable {
        /// What happens to the running tasks.
        #[arg(long, value_enum, default_value_t = DisableOption::Requeue)]
        option: DisableOption,
    },
    /// Take new tasks again; prints the node afterwards.
    Enable,
}

/// `--option` of `scheduling disable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DisableOption {
    /// Stop running tasks now; run them again once scheduling is enabled.
    Requeue,
    /// Stop running tasks now; mark them completed with a failure.
    Terminate,
    /// Let running tasks end.
    #[value(name = "taskcompletion")]
    TaskCompletion,
}

impl From<DisableOption> for DisableSchedulingOption {
    fn from(option: DisableOption) -> Self {
        match option {
            DisableOption::Requeue => DisableSchedulingOption::Requeue,
            DisableOption::Terminate => DisableSchedulingOption::Terminate,
            DisableOption::TaskCompletion => DisableSchedulingOption::TaskCompletion,
        }
    }
}

impl SchedulingCommand {
    /// Runs the command against `client`'s agent, then shows its node.
    pub async fn run(self, client: &Client, format: Format) -> anyhow::Result<()> {
        let agent = client.base_url();
        match self {
            SchedulingCommand::Disable { option } => client
                .disable_scheduling(option.into())
                .await
                .with_context(|| format!("disabling scheduling on {agent}"))?,
            SchedulingCommand::Enable => client
                .enable_scheduling()
                .await
                .with_context(|| format!("enabling scheduling on {agent}"))?,
        }
        node_cmd::run(std::slice::from_ref(client), format).await
    }
}
