//! `--waves 1,5%,25%,100%`: how a fleet is cut into canary waves, as
//! Ansible's `serial` does (each entry is the size of one wave, by count
//! or percentage of the fleet; the last entry repeats until every node is
//! in a wave).

use std::str::FromStr;

/// The size of one wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveSize {
    /// This many nodes.
    Count(usize),
    /// This percentage of the fleet, rounded up (so at least one node).
    Percent(u32),
}

/// The parsed `--waves`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waves(Vec<WaveSize>);

impl Default for Waves {
    /// One canary, then the rest.
    fn default() -> Self {
        Waves(vec![WaveSize::Count(1), WaveSize::Percent(100)])
    }
}

impl FromStr for Waves {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut sizes = Vec::new();
        for part in text.split(',').map(str::trim) {
            let size = match part.strip_suffix('%') {
                Some(percent) => match percent.trim().parse::<u32>() {
                    Ok(p) if (1..=100).contains(&p) => WaveSize::Percent(p),
                    _ => return Err(format!("{part:?} is not a percentage from 1% to 100%")),
                },
                None => match part.parse::<usize>() {
                    Ok(n) if n > 0 => WaveSize::Count(n),
                    _ => return Err(format!("{part:?} is neither a node count nor N%")),
                },
            };
            sizes.push(size);
        }
        Ok(Waves(sizes))
    }
}

impl Waves {
    /// The number of nodes in each wave for a fleet of `total`.
    pub fn sizes(&self, total: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut placed = 0;
        let mut entries = self.0.iter();
        let mut current = WaveSize::Count(total.max(1));
        while placed < total {
            if let Some(next) = entries.next() {
                current = *next;
            }
            let size = match current {
                WaveSize::Count(n) => n,
                WaveSize::Percent(p) => (total * p as usize).div_ceil(100).max(1),
            };
            let size = size.min(total - placed);
            sizes.push(size);
            placed += size;
        }
        sizes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waves(text: &str) -> Waves {
        text.parse().expect("valid waves")
    }

    #[test]
    fn waves_are_counts_or_percentages_and_the_last_one_repeats() {
        assert_eq!(waves("1,5%,25%,100%").sizes(100), [1, 5, 25, 69]);
        assert_eq!(waves("1,10%").sizes(30), [1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2]);
        assert_eq!(waves("2").sizes(5), [2, 2, 1]);
        assert_eq!(Waves::default().sizes(1), [1]);
        assert_eq!(Waves::default().sizes(4), [1, 3]);
        assert_eq!(waves("50%").sizes(3), [2, 1]);
        assert!(Waves::default().sizes(0).is_empty());
    }

    #[test]
    fn bad_wave_sizes_are_refused() {
        for bad in ["0", "0%", "101%", "x", "1,,2", ""] {
            assert!(bad.parse::<Waves>().is_err(), "{bad:?}");
        }
    }
}
