//! `fwctl`: the command line for people and CI.
//!
//! Thin by design: every decision is made by `fw-compiler`; this binary reads files, calls the
//! library and formats what comes back. Exit codes are part of the interface: 0 success,
//! 1 the input is invalid or a check failed, 2 usage error (clap's own).

mod daemon;
mod dataplane;
mod inputs;
mod render;
mod show;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use fw_compiler::ast::{Direction, Proto};
use fw_compiler::load::{self, Loaded};
use fw_compiler::mapstate::Capacities;
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;

use crate::render::Format;

#[derive(Parser)]
#[command(
    name = "fwctl",
    version,
    about = "Declarative host firewall: check, compile and explain fw/v1 policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check policy files: exit 0 when valid, 1 when not.
    Validate {
        /// Files, or folders searched for *.yaml and *.yml.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Compile the policy for one host and print the map state.
    Compile {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        host: HostArgs,
        #[arg(long, value_enum, default_value_t = StateFormat::Table)]
        format: StateFormat,
    },
    /// Run every PolicyTest case through the reference evaluator and the compiled lookup.
    Test {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print passing cases too.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Decide one packet or connection and say why.
    Explain(ExplainArgs),
    /// Print the JSON Schema of fw/v1 documents.
    Schema,
    /// Compile the policy for this host and make the kernel enforce it (needs root).
    Apply(dataplane::DataplaneArgs),
    /// Print what `apply` would change, as rules: exit 0 no change, 1 changes, 2 error (needs
    /// root).
    Diff(dataplane::DataplaneArgs),
    /// Show the loaded data plane: programs, attachments, generations, maps, counters; or,
    /// with --socket, what a running fwd reports.
    Status(dataplane::StatusArgs),
    /// Detach and unpin the data plane.
    Unload(dataplane::RootArgs),
    /// Follow the data plane's events (logged rule hits, default denies, audit-denies), one
    /// line each, until Ctrl-C (needs root).
    Events(dataplane::EventsArgs),
}

#[derive(Args)]
struct HostArgs {
    /// The host's name.
    #[arg(long = "host", value_name = "NAME")]
    name: String,
    /// A host label, `key=value`; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

impl HostArgs {
    fn identity(&self) -> HostIdentity {
        HostIdentity {
            name: self.name.clone(),
            labels: self.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StateFormat {
    Table,
    Json,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("direction").required(true).args(["ingress", "egress"])))]
struct ExplainArgs {
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    host: HostArgs,
    /// A packet arriving at the host.
    #[arg(long, requires = "from")]
    ingress: bool,
    /// A connection or datagram sent by a local process.
    #[arg(long, requires = "to")]
    egress: bool,
    /// Source address (with --ingress).
    #[arg(long, conflicts_with = "egress")]
    from: Option<IpAddr>,
    /// Destination address (with --egress).
    #[arg(long, conflicts_with = "ingress")]
    to: Option<IpAddr>,
    /// The sending process's cgroup v2 path (with --egress); absent = the root cgroup.
    #[arg(long, requires = "egress")]
    workload: Option<String>,
    /// tcp, udp, icmp, icmpv6, or a protocol number.
    #[arg(long)]
    proto: String,
    /// Destination port (tcp, udp).
    #[arg(long)]
    port: Option<u16>,
    /// ICMP or ICMPv6 type, by name or number.
    #[arg(long)]
    icmp: Option<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Validate { paths, format } => validate(&paths, format),
        Command::Compile { paths, host, format } => compile(&paths, &host, format),
        Command::Test { paths, verbose } => test(&paths, verbose),
        Command::Explain(args) => explain(&args),
        Command::Schema => {
            let schema = fw_compiler::schema::json_schema();
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply(args) => dataplane::apply(&args),
        Command::Diff(args) => dataplane::diff(&args),
        Command::Status(args) => dataplane::status(&args),
        Command::Unload(args) => dataplane::unload(&args),
        Command::Events(args) => dataplane::events(&args),
    }
}

/// Reads and checks the policy; on errors prints them (to stderr) and returns `None`.
fn load_checked(paths: &[PathBuf]) -> Option<Loaded> {
    let limits = ParseLimits::default();
    let (inputs, mut io_diags) = inputs::collect(paths, &limits);
    let mut loaded = load::load(inputs, &limits);
    io_diags.append(&mut loaded.diagnostics);
    loaded.diagnostics = io_diags;
    if !loaded.diagnostics.is_empty() {
        let colour = render::colour(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        eprint!(
            "{}",
            render::diagnostics(&loaded.diagnostics, &loaded.sources, Format::Human, colour)
        );
    }
    let has_errors = loaded.diagnostics.iter().any(|d| d.is_error());
    if has_errors {
        eprintln!("policy is invalid: {}", render::summary(&loaded.diagnostics));
        None
    } else {
        Some(loaded)
    }
}

fn validate(paths: &[PathBuf], format: Format) -> Result<ExitCode> {
    let limits = ParseLimits::default();
    let (inputs, mut diags) = inputs::collect(paths, &limits);
    let files = inputs.len();
    let loaded = load::load(inputs, &limits);
    diags.extend(loaded.diagnostics.iter().cloned());
    // A valid policy must also fit the data plane: compile it for every host that a
    // PolicyTest describes, so capacity errors surface in CI rather than on a host.
    if let Some(set) = &loaded.policy_set {
        for host in set.test_hosts() {
            if let Err(errors) =
                fw_compiler::compile::compile(&set.for_host(&host), &Capacities::default())
            {
                diags.extend(errors);
            }
        }
    }
    print!("{}", render::diagnostics(&diags, &loaded.sources, format, render::stdout_colour()));
    let errors = diags.iter().any(|d| d.is_error());
    if format == Format::Human {
        let files = render::count(files, "file");
        if errors {
            println!("{files} checked: {}", render::summary(&diags));
        } else {
            let documents = render::count(loaded.documents.len(), "document");
            println!("{files}, {documents}: valid ({})", render::summary(&diags));
        }
    }
    Ok(if errors { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn compile(paths: &[PathBuf], host: &HostArgs, format: StateFormat) -> Result<ExitCode> {
    let Some(loaded) = load_checked(paths) else { return Ok(ExitCode::from(1)) };
    let set = loaded.policy_set.context("no policy set")?;
    let policy = set.for_host(&host.identity());
    let state = match fw_compiler::compile::compile(&policy, &Capacities::default()) {
        Ok(s) => s,
        Err(errors) => {
            eprint!("{}", render::diagnostics(&errors, &loaded.sources, Format::Human, false));
            return Ok(ExitCode::from(1));
        }
    };
    match format {
        StateFormat::Json => println!("{}", show::state_json(&state)?),
        StateFormat::Table => print!("{}", show::state_table(&state)),
    }
    Ok(ExitCode::SUCCESS)
}

fn test(paths: &[PathBuf], verbose: bool) -> Result<ExitCode> {
    let Some(loaded) = load_checked(paths) else { return Ok(ExitCode::from(1)) };
    let set = loaded.policy_set.context("no policy set")?;
    let report = fw_compiler::testing::run(&set, &loaded.sources, &Capacities::default());
    if !report.compile_errors.is_empty() {
        eprint!(
            "{}",
            render::diagnostics(&report.compile_errors, &loaded.sources, Format::Human, false)
        );
    }
    print!("{}", show::test_report(&set, &report, verbose));
    Ok(if report.failed() == 0 && report.compile_errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn explain(args: &ExplainArgs) -> Result<ExitCode> {
    let (direction, peer) = match (args.ingress, args.from, args.egress, args.to) {
        (true, Some(from), false, None) => (Direction::Ingress, from),
        (false, None, true, Some(to)) => (Direction::Egress, to),
        _ => bail!("give either --ingress --from IP or --egress --to IP"),
    };
    let proto = show::parse_proto(&args.proto)?;
    let icmp = match &args.icmp {
        Some(t) => Some(show::parse_icmp(proto, t)?),
        None => None,
    };
    if args.port.is_some() && !matches!(proto, show::ProtoArg::Named(Proto::Tcp | Proto::Udp)) {
        bail!("--port needs --proto tcp or udp");
    }
    let Some(loaded) = load_checked(&args.paths) else { return Ok(ExitCode::from(1)) };
    let set = loaded.policy_set.context("no policy set")?;
    let policy = set.for_host(&args.host.identity());
    let mut flow = fw_compiler::model::Flow::new(direction, peer, proto.number());
    flow.port = args.port;
    flow.icmp_type = icmp;
    flow.workload =
        args.workload.as_deref().map(|w| w.trim_matches('/').to_string()).filter(|w| !w.is_empty());
    let explanation = fw_compiler::eval::evaluate(&policy, &flow);
    let compiled = fw_compiler::compile::compile(&policy, &Capacities::default())
        .ok()
        .map(|state| state.lookup(&flow));
    print!("{}", show::explanation(&policy, &flow, &explanation, compiled.as_ref()));
    Ok(ExitCode::SUCCESS)
}
