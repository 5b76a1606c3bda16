//! `kiln serve`: a model over HTTP (KServe v1 and v2, OpenAI completions), continuously batched.

use std::io::Write;
use std::time::Duration;

use clap::ValueEnum;

use super::*;
use crate::serve::auth::ApiKey;
use crate::serve::connections::ConnectionLimits;
use crate::serve::scheduler::Limits;
use crate::serve::ServeOptions;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Hugging Face model directory (with its tokenizer), or a Hub model id `owner/name[@revision]`
    /// (downloaded into the HF cache).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory, merged into the model's weights as they load.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The model's name in URLs and requests (default: the model directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Address to listen on; a non-loopback one without an API key is warned about.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed when ready).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Rows decoded together at most (1 serves one prompt at a time).
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_batch: usize,
    /// Positions (prompt plus max new tokens) the rows decoded together may reserve in all.
    #[arg(long, default_value_t = 32768, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_batch_tokens: usize,
    /// Prompt tokens read in one prefill pass at most: the rows joining the batch at one token
    /// boundary, so that long prompts arriving do not stall the rows decoding.
    #[arg(long, default_value_t = 2048, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_prefill_tokens: usize,
    /// Prompts (or :classify instances) in one request at most; more are answered 413.
    #[arg(long, default_value_t = 4096, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_prompts: usize,
    /// Instances × label words of one :classify request at most; more are answered 413.
    #[arg(long, default_value_t = 16384, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_classify_pairs: usize,
    /// MiB that one chunk of :classify scoring may use for its temporaries (KV cache,
    /// activations, logits); a request is scored chunk by chunk, between decode steps.
    #[arg(long, default_value_t = 256, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1 << 20))]
    pub score_memory_mib: usize,
    /// Requests waiting to start at most; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Seconds from a request's arrival to its last token; later it is stopped (504).
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Requests must send `Authorization: Bearer KEY` or are answered 401; /v2/health/live,
    /// /v2/health/ready and /metrics stay open. Default: the KILN_API_KEY environment variable;
    /// neither set serves without authentication.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Seconds a client has to send a request's head, from its first byte (a new connection's
    /// first request: from connecting); later the connection is closed.
    #[arg(long, default_value_t = 10.0)]
    pub header_read_timeout: f64,
    /// Seconds a connection may sit with no request in flight (or with a request body that
    /// stopped arriving) before it is closed. Above the usual 60 s of a load balancer's idle
    /// timeout, so the balancer, not the server, closes its pooled connections.
    #[arg(long, default_value_t = 75.0)]
    pub idle_timeout: f64,
    /// Connections open at once; a client over the cap waits in the listen backlog until
    /// another connection closes (nothing is refused).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// CPU threads for the model (default: all cores).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub quantize: super::QuantizeArgs,
    /// Compute dtype: fp32, fp16 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Request logs (stderr) as text or as one JSON object a line.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn seconds(flag: &str, value: f64) -> Result<Duration> {
    anyhow::ensure!(
        value > 0.0 && value.is_finite(),
        "{flag} must be a positive number of seconds, got {value}"
    );
    Ok(Duration::from_secs_f64(value))
}

/// `--api-key`, else `KILN_API_KEY`; a key given but empty is an error, not an open server.
fn api_key(flag: Option<&str>) -> Result<Option<ApiKey>> {
    let (source, key) = match flag {
        Some(key) => ("--api-key", key.to_string()),
        None => match std::env::var("KILN_API_KEY") {
            Ok(key) => ("KILN_API_KEY", key),
            Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                anyhow::bail!("KILN_API_KEY is not valid UTF-8")
            }
        },
    };
    ApiKey::new(&key).map(Some).context(source)
}

pub(super) fn serve(mut args: ServeArgs) -> Result<()> {
    let spec = args.model.clone();
    args.model = model_dir(&spec)?;
    let served_from_hub = args.model != spec;
    let timeout = seconds("--timeout", args.timeout)?;
    let connections = ConnectionLimits {
        header_read_timeout: seconds("--header-read-timeout", args.header_read_timeout)?,
        idle_timeout: seconds("--idle-timeout", args.idle_timeout)?,
        max_connections: args.max_connections,
    };
    let api_key = api_key(args.api_key.as_deref())?;
    let host: std::net::IpAddr = args
        .host
        .parse()
        .with_context(|| format!("--host {:?} is not an IP address", args.host))?;
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("cannot size the thread pool")?;
    }
    process::configure_process();
    let dtype = model::parse_dtype(&args.dtype)?;
    let device = ops::parse_device(&args.device)?;
    let model = model::load_model_quantized(
        &args.model,
        args.adapter.as_deref(),
        dtype,
        &device,
        args.quantize.quantization()?,
    )?;
    let tokenizer = adapter_or_model_tokenizer(&args.model, args.adapter.as_deref(), model.config().vocab_size())?.with_context(|| {
        format!(
            "{}: serving text needs a tokenizer (tokenizer.json, or vocab.json and merges.txt) in the model directory",
            args.model.display()
        )
    })?;
    let name = match args.name {
        Some(name) => name,
        // A Hub model is served under its repo name, a directory under its own name.
        None if served_from_hub => hub_spec(&spec.to_string_lossy())
            .0
            .rsplit('/')
            .next()
            .unwrap_or("model")
            .into(),
        None => args
            .model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into()),
    };
    anyhow::ensure!(
        !name.is_empty() && !name.contains(['/', ':', '?', '#']),
        "--name {name:?}: a model name cannot be empty or contain '/', ':', '?' or '#'"
    );
    let options = ServeOptions {
        name: name.clone(),
        addr: std::net::SocketAddr::new(host, args.port),
        limits: Limits {
            max_batch: args.max_batch,
            max_batch_tokens: args.max_batch_tokens,
            max_prefill_tokens: args.max_prefill_tokens,
            max_queue: args.max_queue,
            max_prompts: args.max_prompts,
            max_classify_pairs: args.max_classify_pairs,
            score_budget_bytes: args.score_memory_mib << 20,
            timeout,
        },
        max_body_bytes: args.max_body_bytes,
        api_key,
        connections,
    };
    crate::serve::serve(model, tokenizer, options, |addr| {
        println!("serving {name} on http://{addr}");
        let _ = std::io::stdout().flush();
        tracing::info!(model = %name, %addr, "ready");
    })?;
    // Not on stdout: whoever read the address line may have closed it since.
    tracing::info!("stopped");
    Ok(())
}
