//! A throwaway PostgreSQL (Debian package `postgresql`) for tests: a cluster made with
//! `initdb` in a temporary directory, listening on a Unix socket only, run as the `postgres`
//! user (PostgreSQL refuses root). `pg_ctl stop` ends it and the directory goes on drop.

use std::{
    fs,
    os::unix::fs::{PermissionsExt, chown},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use crate::lab;

/// The database every test uses; its owner is the cluster's superuser of the same name.
pub const DB: &str = "fleet";
/// Any port: the server listens on a Unix socket only, whose name carries the port.
pub const PORT: u16 = 5432;
const LIMIT: Duration = Duration::from_secs(60);

pub struct Postgres {
    dir: PathBuf,
    running: bool,
}

impl Postgres {
    /// Creates the cluster and the database [`DB`], and starts the server.
    pub fn start(name: &str) -> Postgres {
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(format!("pg-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
        let (uid, gid) = postgres_ids();
        chown(&dir, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {dir:?}: {e}"));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut pg = Postgres {
            dir,
            running: false,
        };
        let data = pg.data();
        let socket = pg.socket_dir();
        fs::create_dir_all(&socket).expect("socket dir");
        chown(&socket, Some(uid), Some(gid)).expect("chown socket dir");
        pg.as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                &data,
                "-U",
                DB,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories={} -p {PORT} -c fsync=off",
            socket.display()
        );
        let log = pg.dir.join("server.log").display().to_string();
        pg.as_postgres(
            &bin.join("pg_ctl"),
            &["-D", &data, "-o", &options, "-l", &log, "-w", "start"],
        );
        pg.running = true;
        pg.psql_command(&format!("CREATE DATABASE {DB}"), "postgres");
        pg
    }

    /// The directory of the server's Unix socket: libpq's `host`.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("socket")
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Runs the SQL in `file` against [`DB`] with psql variables `vars`; returns its rows,
    /// unaligned, fields separated by `|`.
    pub fn psql_file(&self, file: &Path, vars: &[(&str, &str)]) -> String {
        let copy = self.dir.join(file.file_name().expect("a file name"));
        fs::copy(file, &copy).unwrap_or_else(|e| panic!("copying {file:?}: {e}"));
        let mut args = self.psql_args(DB);
        for (name, value) in vars {
            args.extend(["-v".to_string(), format!("{name}={value}")]);
        }
        args.extend(["-f".to_string(), copy.display().to_string()]);
        self.psql(&args)
    }

    /// Runs one SQL command against database `db`; returns its rows as [`Self::psql_file`].
    pub fn psql_command(&self, sql: &str, db: &str) -> String {
        let mut args = self.psql_args(db);
        args.extend(["-c".to_string(), sql.to_string()]);
        self.psql(&args)
    }

    fn psql_args(&self, db: &str) -> Vec<String> {
        [
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &self.socket_dir().display().to_string(),
            "-p",
            &PORT.to_string(),
            "-U",
            DB,
            "-d",
            db,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn psql(&self, args: &[String]) -> String {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.as_postgres(&bin_dir().join("psql"), &args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn as_postgres(&self, program: &Path, args: &[&str]) -> Output {
        let out = lab::run_bounded(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(program)
                .args(args)
                .current_dir(&self.dir),
            LIMIT,
        );
        assert!(
            out.status.success(),
            "{} {args:?} as postgres: {}\n{}{}\nserver log: {}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
        out
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let pg_ctl = bin_dir().join("pg_ctl");
            let _ = lab::run_bounded(
                Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .arg(pg_ctl)
                    .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"]),
                LIMIT,
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The newest installed server's binaries (`/usr/lib/postgresql/<major>/bin`).
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .map(|major| root.join(major.to_string()).join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server under {root:?}: run `cargo xtask setup` (Debian's postgresql)"
            )
        })
}

fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("running id");
        assert!(
            out.status.success(),
            "no postgres user: run `cargo xtask setup` (Debian's postgresql creates it)"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}
