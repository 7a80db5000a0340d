//! The load client of `scripts/bench` for what h2load and wrk cannot do:
//! seeding users, draining ListUsers streams, a WatchUsers fan-out, and
//! holding idle connections or open streams while the server's memory is
//! read. Every subcommand prints one JSON line with its counts.
//!
//! Built only with `--features bench-bare`; `bench-client --help` lists the
//! subcommands.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use keel::proto::user::v1::user_service_client::UserServiceClient;
use keel::proto::user::v1::{CreateUserRequest, ListUsersRequest, UpdateUserRequest, User, WatchUsersRequest};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

#[derive(Parser)]
#[command(name = "bench-client", about = "Load client of scripts/bench")]
struct Cli {
    /// The gRPC server, e.g. http://127.0.0.1:9000.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9000")]
    addr: String,
    /// Bearer token sent with every call (empty: none).
    #[arg(long, global = true, default_value = "")]
    token: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// CreateUser `count` users `u000000`, `u000001`, ...
    Seed {
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
    /// ListUsers over and over from `concurrency` callers for `seconds`.
    List {
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
    },
    /// `subscribers` WatchUsers streams over `connections` connections;
    /// then `updates` UpdateUser calls at `rate` per second; counts the
    /// events delivered. `stalled` more streams, on a connection of their
    /// own, are opened and never read until the updates are done (a
    /// subscriber that stopped reading); `large` makes every update the
    /// largest user the field limits allow (about 4.6 kB).
    Watch {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 10)]
        connections: usize,
        #[arg(long, default_value_t = 1000)]
        updates: u64,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 0)]
        stalled: usize,
        #[arg(long)]
        large: bool,
    },
    /// Opens `connections` connections and `streams` WatchUsers streams
    /// over them, prints `{"ready": ...}`, holds them until stdin closes,
    /// then closes them all and exits.
    Hold {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value_t = 0)]
        streams: usize,
    },
}

/// Adds the bearer token to every call.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = UserServiceClient<InterceptedService<Channel, Bearer>>;

struct Connector {
    endpoint: Endpoint,
    bearer: Bearer,
}

impl Connector {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_shared(cli.addr.clone())?.tcp_nodelay(true);
        let bearer = if cli.token.is_empty() {
            Bearer(None)
        } else {
            Bearer(Some(MetadataValue::try_from(format!("Bearer {}", cli.token))?))
        };
        Ok(Self { endpoint, bearer })
    }

    /// A client on a new connection of its own, connected before it returns.
    async fn connect(&self) -> anyhow::Result<Client> {
        let channel = self.endpoint.connect().await?;
        Ok(UserServiceClient::with_interceptor(channel, self.bearer.clone()).max_decoding_message_size(usize::MAX))
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli).await {
        eprintln!("bench-client: {error:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let connector = Connector::new(&cli)?;
    match cli.command {
        Command::Seed { count } => seed(&connector, count).await,
        Command::List { seconds, concurrency } => list(&connector, seconds, concurrency).await,
        Command::Watch { subscribers, connections, updates, rate, stalled, large } => {
            let shape = WatchShape { subscribers, connections, updates, rate, stalled, large };
            watch(&connector, shape).await
        }
        Command::Hold { connections, streams } => hold(&connector, connections, streams).await,
    }
}

fn user(user_id: String) -> User {
    User {
        display_name: format!("User {user_id}"),
        email: format!("{user_id}@example.com"),
        roles: vec!["reader".into()],
        user_id,
        ..User::default()
    }
}

async fn seed(connector: &Connector, count: usize) -> anyhow::Result<()> {
    let client = connector.connect().await?;
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (mut client, next, errors) = (client.clone(), next.clone(), errors.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let request = CreateUserRequest { user: Some(user(format!("u{i:06}"))) };
                // AlreadyExists is fine: a second seed of the same server.
                if let Err(status) = client.create_user(request).await
                    && status.code() != tonic::Code::AlreadyExists
                {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    workers.join_all().await;
    println!(r#"{{"seeded": {count}, "errors": {}}}"#, errors.load(Ordering::Relaxed));
    Ok(())
}

async fn list(connector: &Connector, seconds: f64, concurrency: usize) -> anyhow::Result<()> {
    let client = connector.connect().await?;
    let messages = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (mut client, messages, calls, errors) = (client.clone(), messages.clone(), calls.clone(), errors.clone());
        workers.spawn(async move {
            while Instant::now() < until {
                let mut stream = match client.list_users(ListUsersRequest {}).await {
                    Ok(response) => response.into_inner(),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {
                            messages.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None) => break,
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    workers.join_all().await;
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        r#"{{"messages": {}, "calls": {}, "errors": {}, "seconds": {elapsed:.3}}}"#,
        messages.load(Ordering::Relaxed),
        calls.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn connect_many(connector: &Connector, connections: usize) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        clients.push(connector.connect().await?);
    }
    Ok(clients)
}

/// The fan-out `watch` runs.
struct WatchShape {
    subscribers: usize,
    connections: usize,
    updates: u64,
    rate: f64,
    stalled: usize,
    large: bool,
}

/// The largest user the example service's field limits accept: a 256-char
/// name, a 320-byte email and 64 roles of 64 bytes.
fn large_user(user_id: String, n: u64) -> User {
    let mut user = user(user_id);
    user.display_name = format!("{n:0>256}");
    user.email = format!("{}@example.com", "e".repeat(320 - "@example.com".len()));
    user.roles = (0..64).map(|i| format!("{i:0>64}")).collect();
    user
}

async fn watch(connector: &Connector, shape: WatchShape) -> anyhow::Result<()> {
    const WATCHED: &str = "watched";
    let WatchShape { subscribers, connections, updates, rate, stalled, large } = shape;
    let mut writer = connector.connect().await?;
    if let Err(status) = writer.create_user(CreateUserRequest { user: Some(user(WATCHED.into())) }).await
        && status.code() != tonic::Code::AlreadyExists
    {
        return Err(status.into());
    }
    let clients = connect_many(connector, connections).await?;
    // Open every stream before the first change: the server subscribes
    // before it answers with the headers awaited here.
    let mut streams = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let mut client = clients[i % clients.len()].clone();
        streams.push(client.watch_users(WatchUsersRequest {}).await?.into_inner());
    }
    // Never polled until the updates are done: the server must bound what
    // it holds for them, in bytes, and cut them off.
    let stalled_client = connector.connect().await?;
    let mut stalled_streams = Vec::with_capacity(stalled);
    for _ in 0..stalled {
        stalled_streams.push(stalled_client.clone().watch_users(WatchUsersRequest {}).await?.into_inner());
    }
    let delivered = Arc::new(AtomicU64::new(0));
    let ended_early = Arc::new(AtomicU64::new(0));
    let last_delivery = Arc::new(std::sync::Mutex::new(Instant::now()));
    let mut readers = tokio::task::JoinSet::new();
    for mut stream in streams {
        let (delivered, ended_early, last_delivery) = (delivered.clone(), ended_early.clone(), last_delivery.clone());
        readers.spawn(async move {
            let mut seen = 0;
            while seen < updates {
                match stream.message().await {
                    Ok(Some(_)) => {
                        seen += 1;
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        ended_early.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            let now = Instant::now();
            let mut last = last_delivery.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *last = (*last).max(now);
        });
    }
    let start = Instant::now();
    *last_delivery.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = start;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    let mut update_errors = 0u64;
    for n in 0..updates {
        ticks.tick().await;
        let patch = if large {
            large_user(WATCHED.into(), n)
        } else {
            let mut patch = user(WATCHED.into());
            patch.display_name = format!("update {n}");
            patch
        };
        if writer.update_user(UpdateUserRequest { user: Some(patch), update_mask: None }).await.is_err() {
            update_errors += 1;
        }
    }
    // Bounded: a stuck subscriber must not hang the suite.
    let grace = Duration::from_secs(10);
    let finished = tokio::time::timeout(grace, readers.join_all()).await.is_ok();
    let seconds = last_delivery.lock().unwrap_or_else(std::sync::PoisonError::into_inner).duration_since(start);
    // Now read the stalled streams: what the server kept for them, and how
    // they ended (keel cuts a subscriber off once its buffer is full).
    let (mut stalled_received, mut stalled_ends) = (0u64, Vec::new());
    for mut stream in stalled_streams {
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                Ok(Ok(Some(_))) => stalled_received += 1,
                Ok(Ok(None)) => break "ok".to_string(),
                Ok(Err(status)) => break format!("{:?}", status.code()),
                Err(_) => break "still open".to_string(),
            }
        };
        stalled_ends.push(end);
    }
    println!(
        r#"{{"delivered": {}, "expected": {}, "seconds": {:.3}, "ended_early": {}, "update_errors": {update_errors}, "timed_out": {}, "stalled_received": {stalled_received}, "stalled_ends": {:?}}}"#,
        delivered.load(Ordering::Relaxed),
        subscribers as u64 * updates,
        seconds.as_secs_f64(),
        ended_early.load(Ordering::Relaxed),
        !finished,
        stalled_ends
    );
    Ok(())
}

async fn hold(connector: &Connector, connections: usize, streams: usize) -> anyhow::Result<()> {
    let clients = connect_many(connector, connections).await?;
    let mut open = Vec::with_capacity(streams);
    for i in 0..streams {
        let mut client = clients[i % clients.len()].clone();
        open.push(client.watch_users(WatchUsersRequest {}).await?.into_inner());
    }
    println!(r#"{{"ready": true, "connections": {}, "streams": {}}}"#, clients.len(), open.len());
    // Hold until the suite closes our stdin (or dies, which closes it too).
    let _ = tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())).await;
    drop(open);
    drop(clients);
    Ok(())
}
