"""General-knowledge probes written by the project: ~580 short facts as cloze sentences.

Categories: capitals, continents, languages, chemical symbols, basic science, geography and
landmarks, books and people, animals and colours, calendar and units, opposites, arithmetic.
Each probe is a sentence start (``cloze``), the right ending (``answer``) and three wrong endings
(``distractors``, from the same category, chosen deterministically).

Scoring is by log-likelihood on raw text, no chat template: a probe is right when the model gives
the answer a higher summed log-probability than every distractor (4-way multiple choice, chance =
25%). ``answer_nll`` is the mean negative log-likelihood per token of the right answers: a
continuous measure that moves before accuracy does. Raw text is used because it measures what the
network knows rather than how it formats a chat reply, which is what fine-tuning changes on purpose.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from tuneforge.data.conversation import Message
from tuneforge.eval.items import EvalItem

# country | capital | continent (- = transcontinental or ambiguous: no continent probe)
COUNTRIES = """\
France|Paris|Europe;Germany|Berlin|Europe;Italy|Rome|Europe;Spain|Madrid|Europe;Portugal|Lisbon|Europe;
the United Kingdom|London|Europe;Ireland|Dublin|Europe;the Netherlands|Amsterdam|Europe;Belgium|Brussels|Europe;
Switzerland|Bern|Europe;Austria|Vienna|Europe;Poland|Warsaw|Europe;the Czech Republic|Prague|Europe;
Hungary|Budapest|Europe;Greece|Athens|Europe;Sweden|Stockholm|Europe;Norway|Oslo|Europe;
Denmark|Copenhagen|Europe;Finland|Helsinki|Europe;Iceland|Reykjavik|Europe;Russia|Moscow|-;Ukraine|Kyiv|Europe;
Romania|Bucharest|Europe;Bulgaria|Sofia|Europe;Serbia|Belgrade|Europe;Croatia|Zagreb|Europe;Turkey|Ankara|-;
Belarus|Minsk|Europe;Lithuania|Vilnius|Europe;Latvia|Riga|Europe;Estonia|Tallinn|Europe;Slovakia|Bratislava|Europe;
Slovenia|Ljubljana|Europe;Albania|Tirana|Europe;North Macedonia|Skopje|Europe;Malta|Valletta|Europe;
Egypt|Cairo|Africa;Kenya|Nairobi|Africa;Nigeria|Abuja|Africa;Ethiopia|Addis Ababa|Africa;Ghana|Accra|Africa;
Morocco|Rabat|Africa;Algeria|Algiers|Africa;Tunisia|Tunis|Africa;Senegal|Dakar|Africa;Uganda|Kampala|Africa;
Zimbabwe|Harare|Africa;Zambia|Lusaka|Africa;Angola|Luanda|Africa;Sudan|Khartoum|Africa;Libya|Tripoli|Africa;
Madagascar|Antananarivo|Africa;Somalia|Mogadishu|Africa;Rwanda|Kigali|Africa;Mali|Bamako|Africa;
Cameroon|Yaoundé|Africa;Namibia|Windhoek|Africa;Botswana|Gaborone|Africa;Mozambique|Maputo|Africa;
China|Beijing|Asia;Japan|Tokyo|Asia;South Korea|Seoul|Asia;North Korea|Pyongyang|Asia;India|New Delhi|Asia;
Pakistan|Islamabad|Asia;Bangladesh|Dhaka|Asia;Nepal|Kathmandu|Asia;Thailand|Bangkok|Asia;Vietnam|Hanoi|Asia;
Indonesia|Jakarta|Asia;the Philippines|Manila|Asia;Malaysia|Kuala Lumpur|Asia;Iran|Tehran|Asia;Iraq|Baghdad|Asia;
Saudi Arabia|Riyadh|Asia;Syria|Damascus|Asia;Jordan|Amman|Asia;Lebanon|Beirut|Asia;Afghanistan|Kabul|Asia;
Kazakhstan|Astana|-;Uzbekistan|Tashkent|Asia;Mongolia|Ulaanbaatar|Asia;Qatar|Doha|Asia;
the United Arab Emirates|Abu Dhabi|Asia;Oman|Muscat|Asia;Armenia|Yerevan|-;Georgia|Tbilisi|-;Azerbaijan|Baku|-;
Cambodia|Phnom Penh|Asia;Laos|Vientiane|Asia;Taiwan|Taipei|Asia;
the United States|Washington|North America;Canada|Ottawa|North America;Mexico|Mexico City|North America;
Cuba|Havana|North America;Jamaica|Kingston|North America;Guatemala|Guatemala City|North America;
Honduras|Tegucigalpa|North America;Nicaragua|Managua|North America;Costa Rica|San José|North America;
Panama|Panama City|North America;Haiti|Port-au-Prince|North America;the Dominican Republic|Santo Domingo|North America;
Brazil|Brasília|South America;Argentina|Buenos Aires|South America;Chile|Santiago|South America;
Peru|Lima|South America;Colombia|Bogotá|South America;Venezuela|Caracas|South America;Ecuador|Quito|South America;
Uruguay|Montevideo|South America;Paraguay|Asunción|South America;
Australia|Canberra|Oceania;New Zealand|Wellington|Oceania;Fiji|Suva|Oceania"""

LANGUAGES = """\
France|French;Germany|German;Italy|Italian;Spain|Spanish;Portugal|Portuguese;Brazil|Portuguese;Mexico|Spanish;
Argentina|Spanish;Japan|Japanese;China|Chinese;South Korea|Korean;Russia|Russian;Poland|Polish;
the Netherlands|Dutch;Sweden|Swedish;Norway|Norwegian;Denmark|Danish;Finland|Finnish;Greece|Greek;Turkey|Turkish;
Hungary|Hungarian;the Czech Republic|Czech;Romania|Romanian;Ukraine|Ukrainian;Thailand|Thai;Vietnam|Vietnamese;
Indonesia|Indonesian;Iran|Persian;Israel|Hebrew;Egypt|Arabic;Saudi Arabia|Arabic;Iceland|Icelandic;
Bulgaria|Bulgarian;Croatia|Croatian;Serbia|Serbian;Lithuania|Lithuanian;Latvia|Latvian;Estonia|Estonian;
Slovakia|Slovak;Slovenia|Slovenian;Albania|Albanian;Cuba|Spanish;Chile|Spanish;Peru|Spanish;Colombia|Spanish;
Australia|English;the United Kingdom|English;the United States|English;New Zealand|English;Bangladesh|Bengali;
Pakistan|Urdu;Mongolia|Mongolian;Cambodia|Khmer;Laos|Lao"""

ELEMENTS = """\
hydrogen|H;helium|He;lithium|Li;carbon|C;nitrogen|N;oxygen|O;fluorine|F;neon|Ne;sodium|Na;magnesium|Mg;
aluminium|Al;silicon|Si;phosphorus|P;sulfur|S;chlorine|Cl;argon|Ar;potassium|K;calcium|Ca;iron|Fe;copper|Cu;
zinc|Zn;silver|Ag;gold|Au;tin|Sn;lead|Pb;mercury|Hg;uranium|U;nickel|Ni;iodine|I;platinum|Pt;titanium|Ti;
cobalt|Co"""

# cloze | answer | three distractors (comma-separated)
FACTS = """\
At sea level, water boils at|100 degrees Celsius|0 degrees Celsius,50 degrees Celsius,200 degrees Celsius
Pure water freezes at a temperature of|0 degrees Celsius|100 degrees Celsius,10 degrees Celsius,-40 degrees Celsius
The planet closest to the Sun is|Mercury|Venus,Mars,Jupiter
The largest planet in the Solar System is|Jupiter|Mars,Earth,Venus
The planet known as the Red Planet is|Mars|Venus,Jupiter,Saturn
The planet famous for its large rings is|Saturn|Mars,Mercury,Venus
The Earth orbits the|Sun|Moon,Mars,comet
The Moon orbits the|Earth|Sun,Mars,Jupiter
The chemical formula of water is|H2O|CO2,NaCl,O3
Plants take in carbon dioxide and release|oxygen|nitrogen,helium,hydrogen
The process by which plants make food from sunlight is called|photosynthesis|respiration,digestion,evaporation
The hardest natural substance is|diamond|gold,iron,glass
The organ that pumps blood through the body is the|heart|liver,lung,stomach
The largest organ of the human body is the|skin|liver,heart,brain
The number of bones in the adult human body is|206|106,306,150
The force that pulls objects toward the ground is|gravity|magnetism,friction,electricity
Negatively charged particles in an atom are called|electrons|protons,neutrons,photons
The basic unit of life is the|cell|atom,organ,molecule
Ice is the solid form of|water|oil,salt,air
The Sun is a|star|planet,moon,comet
A whale is a|mammal|fish,reptile,insect
A spider has|eight legs|six legs,ten legs,four legs
An insect has|six legs|eight legs,ten legs,four legs
Bees make|honey|milk,silk,butter
Caterpillars turn into|butterflies|frogs,birds,spiders
Tadpoles grow into|frogs|fish,snakes,birds
The boiling point of water in degrees Fahrenheit is|212|100,32,180
The star closest to the Earth is the|Sun|Moon,Polaris,Sirius
The unit of electrical resistance is the|ohm|volt,ampere,watt
The unit of force is the|newton|joule,watt,pascal
The unit of energy is the|joule|newton,volt,ohm
The unit of power is the|watt|joule,newton,ohm
Electric current is measured in|amperes|volts,ohms,watts
Water vapour turning into liquid water is called|condensation|evaporation,melting,freezing
The most abundant gas in the Earth's atmosphere is|nitrogen|oxygen,carbon dioxide,argon
The Earth turns once on its axis every|24 hours|12 hours,7 days,365 days
Blood is red because it contains|hemoglobin|chlorophyll,melanin,keratin
Leaves are green because they contain|chlorophyll|hemoglobin,melanin,keratin
A magnet attracts|iron|wood,glass,plastic
The tallest mountain on Earth is Mount|Everest|Kilimanjaro,Fuji,Blanc
The longest river in Africa is the|Nile|Amazon,Thames,Danube
The largest ocean on Earth is the|Pacific|Atlantic,Indian,Arctic
The largest hot desert in the world is the|Sahara|Gobi,Atacama,Kalahari
The largest country in the world by area is|Russia|Canada,China,Brazil
Mount Fuji is in|Japan|China,Korea,Nepal
The Eiffel Tower is in|Paris|London,Rome,Berlin
The Statue of Liberty is in|New York|Boston,Chicago,Los Angeles
The Great Wall is in|China|Japan,India,Egypt
The pyramids of Giza are in|Egypt|Mexico,Peru,Greece
The Colosseum is in|Rome|Athens,Paris,Madrid
Big Ben is in|London|Paris,Dublin,Berlin
The Taj Mahal is in|India|Pakistan,China,Egypt
The Amazon rainforest is mostly in|Brazil|Mexico,Spain,India
Kangaroos live in the wild in|Australia|Canada,Norway,Argentina
Penguins mostly live in the|Southern Hemisphere|Northern Hemisphere,Arctic,Sahara
The fastest land animal is the|cheetah|elephant,turtle,cow
The largest animal that has ever lived is the blue|whale|shark,bear,elephant
The tallest animal in the world is the|giraffe|elephant,horse,camel
Giant pandas eat mostly|bamboo|fish,meat,grass
A baby dog is called a|puppy|kitten,calf,foal
A baby cat is called a|kitten|puppy,calf,lamb
A baby cow is called a|calf|puppy,kitten,foal
A baby horse is called a|foal|calf,lamb,cub
A baby sheep is called a|lamb|foal,kitten,puppy
A baby bear is called a|cub|lamb,calf,kitten
A baby duck is called a|duckling|puppy,foal,cub
The colour of a ripe banana is|yellow|blue,purple,black
Fresh snow is|white|green,red,blue
The colour of grass is|green|red,purple,orange
On a clear day the sky is|blue|green,red,brown
Coal is|black|white,yellow,pink
Mixing blue and yellow paint gives|green|red,purple,orange
Mixing red and white paint gives|pink|green,blue,black
Romeo and Juliet was written by William|Shakespeare|Wordsworth,Blake,Golding
Pride and Prejudice was written by Jane|Austen|Eyre,Goodall,Fonda
Animal Farm was written by George|Orwell|Eliot,Lucas,Washington
War and Peace was written by Leo|Tolstoy|Chekhov,Pushkin,Gogol
Don Quixote was written by Miguel de|Cervantes|Unamuno,Falla,Molina
Oliver Twist was written by Charles|Dickens|Darwin,Babbage,Chaplin
The Adventures of Tom Sawyer was written by Mark|Twain|Zuckerberg,Antony,Rothko
Frankenstein was written by Mary|Shelley|Poppins,Curie,Stuart
Moby-Dick was written by Herman|Melville|Hesse,Munster,Wouk
Les Misérables was written by Victor|Hugo|Frankenstein,Borg,Emmanuel
The Hobbit was written by J. R. R.|Tolkien|Martin,Rowling,Lewis
Alice's Adventures in Wonderland was written by Lewis|Carroll|Hamilton,Armstrong,Capaldi
The theory of evolution by natural selection was proposed by Charles|Darwin|Dickens,Chaplin,Babbage
The laws of motion and universal gravitation were described by Isaac|Newton|Asimov,Hayes,Stern
The telephone was invented by Alexander Graham|Bell|Fleming,Hamilton,Watt
Penicillin was discovered by Alexander|Fleming|Bell,Hamilton,Pope
The theory of relativity was developed by Albert|Einstein|Schweitzer,Camus,Finney
The first person to walk on the Moon was Neil|Armstrong|Young,Diamond,Gaiman
The Mona Lisa was painted by Leonardo da|Vinci|Silva,Costa,Souza
Marie Curie is famous for her research on|radioactivity|electricity,evolution,gravity
The first President of the United States was George|Washington|Lincoln,Jefferson,Adams"""

OPPOSITES = """\
hot|cold;big|small;up|down;day|night;fast|slow;happy|sad;old|young;open|closed;light|dark;wet|dry;
full|empty;hard|soft;early|late;high|low;long|short;rich|poor;strong|weak;thick|thin;heavy|light;
loud|quiet;inside|outside;push|pull;win|lose;buy|sell;true|false;north|south;east|west;left|right;
above|below;begin|end;love|hate;friend|enemy;question|answer;arrive|leave;remember|forget;cheap|expensive;
clean|dirty;safe|dangerous;sweet|sour;alive|dead"""

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = ("January February March April May June July August September October November "
          "December").split()
UNITS = """\
The number of days in a week is|seven|five,ten,twelve
The number of months in a year is|twelve|ten,seven,fifteen
The number of minutes in an hour is|sixty|thirty,hundred,twelve
The number of seconds in a minute is|sixty|thirty,hundred,twelve
The number of hours in a day is|24|12,60,7
The number of days in a normal year is|365|360,300,100
The number of centimetres in a metre is|100|10,1000,60
The number of metres in a kilometre is|1000|100,10,60
The number of grams in a kilogram is|1000|100,10,60
A triangle has|three sides|four sides,five sides,six sides
A square has|four sides|three sides,five sides,six sides
A hexagon has|six sides|four sides,five sides,eight sides
The number of continents on Earth is|seven|five,nine,twelve
The first letter of the English alphabet is|A|B,Z,E
The last letter of the English alphabet is|Z|A,Y,X
The number of letters in the English alphabet is|26|24,30,20"""


@dataclass(frozen=True)
class Probe:
    """One fact: ``cloze + " " + answer`` is true; ``cloze + " " + d`` is false for each distractor."""

    category: str
    cloze: str
    answer: str
    distractors: tuple[str, ...]

    @property
    def options(self) -> list[str]:
        return [self.answer, *self.distractors]


def _rows(table: str, sep: str = ";") -> list[list[str]]:
    return [r.strip().split("|") for r in table.replace("\n", "" if sep == ";" else "\n").split(sep) if r.strip()]


def _distract(answer: str, pool: list[str], rng: random.Random, n: int = 3) -> tuple[str, ...]:
    others = sorted({p for p in pool if p != answer})
    return tuple(rng.sample(others, n))


def _from_pairs(category: str, pairs: list[tuple[str, str]], cloze: str, rng: random.Random) -> list[Probe]:
    pool = [a for _, a in pairs]
    return [Probe(category, _sentence(cloze.format(k)), a, _distract(a, pool, rng)) for k, a in pairs]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _arithmetic(rng: random.Random) -> list[Probe]:
    probes, seen = [], set()
    for op, n in (("+", 40), ("-", 30), ("×", 30)):
        while sum(p.cloze.split()[1] == op for p in probes) < n:
            if op == "×":
                a, b = rng.randint(2, 12), rng.randint(2, 12)
                ans = a * b
            else:
                a, b = rng.randint(2, 60), rng.randint(2, 40)
                a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
                ans = a + b if op == "+" else a - b
            if (a, op, b) in seen:
                continue
            seen.add((a, op, b))
            wrong = sorted({ans + d for d in (-10, -2, -1, 1, 2, 10) if ans + d >= 0} - {ans})
            probes.append(Probe("arithmetic", f"{a} {op} {b} =", str(ans), tuple(str(w) for w in rng.sample(wrong, 3))))
    return probes


def _sequence(category: str, names: list[str], cloze: str, rng: random.Random) -> list[Probe]:
    pairs = [(names[i], names[(i + 1) % len(names)]) for i in range(len(names))]
    return _from_pairs(category, pairs, cloze, rng)


def all_probes(seed: int = 0) -> list[Probe]:
    """Every probe, in a fixed order (the same seed gives the same distractors)."""
    rng = random.Random(f"probes/{seed}")
    countries = _rows(COUNTRIES)
    probes = _from_pairs("capitals", [(c, cap) for c, cap, _ in countries], "The capital of {} is", rng)
    probes += _from_pairs("continents", [(c, cont) for c, _, cont in countries if cont != "-"],
                          "{} is a country in", rng)
    probes += _from_pairs("languages", [(c, lang) for c, lang in _rows(LANGUAGES)],
                          "The main language spoken in {} is", rng)
    probes += _from_pairs("chemical_symbols", [(e, s) for e, s in _rows(ELEMENTS)],
                          "The chemical symbol for {} is", rng)
    probes += [Probe("science_and_world", c, a, tuple(d.split(","))) for c, a, d in _rows(FACTS, "\n")]
    probes += _from_pairs("opposites", [(w, o) for w, o in _rows(OPPOSITES)], "The opposite of {} is", rng)
    probes += _sequence("calendar", DAYS, "The day after {} is", rng)
    probes += _sequence("calendar", MONTHS, "The month after {} is", rng)
    probes += [Probe("units_and_counting", c, a, tuple(d.split(","))) for c, a, d in _rows(UNITS, "\n")]
    probes += _arithmetic(rng)
    return probes


def sample_probes(n: int | None = None, seed: int = 0) -> list[Probe]:
    """``n`` probes spread over the categories in proportion (all when ``n`` is None or too large)."""
    probes = all_probes(seed)
    if n is None or n >= len(probes):
        return probes
    by_cat: dict[str, list[Probe]] = defaultdict(list)
    for p in probes:
        by_cat[p.category].append(p)
    rng = random.Random(f"probes/sample/{seed}")
    out = []
    for _cat, ps in sorted(by_cat.items()):
        k = max(1, round(n * len(ps) / len(probes)))
        out += rng.sample(ps, min(k, len(ps)))
    return out[:n]


def probe_items(probes: list[Probe] | None = None) -> list[EvalItem]:
    """Probes as chat items (``builtin:probes``): the answer is the reference, options are choices."""
    out = []
    for i, p in enumerate(probes or all_probes()):
        opts = sorted(p.options)
        out.append(EvalItem(prompt=[Message("user", f"Complete the sentence with a word or a short phrase: "
                                                    f"{p.cloze} ...")],
                            reference=p.answer, task=p.category, source=f"builtin:probes#{i}", choices=opts,
                            answer_index=opts.index(p.answer)))
    return out
